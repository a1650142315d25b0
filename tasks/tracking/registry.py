"""The model registry: the pyfunc text generator logged, versions registered, aliases moved.

Registered models are named by aliases (`candidate`, `champion`), never by MLflow's
deprecated stages. A registered model loads back two ways: as the pyfunc (`predict` on
prompts) or, for evaluation and fine-tuning, as the GPT and files it bundles, without
running its code (`load_registered_model`).
"""

from __future__ import annotations

import getpass
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode

from model.checkpoint import checkpoint_step, load_model
from model.errors import UserError
from model.gpt import GPT
from tasks.tracking.pyfunc import CONFIG_ARTIFACT, PARAM_DEFAULTS, TOKENIZER_ARTIFACT, TOKENS_ARTIFACT, WEIGHTS_ARTIFACT
from tasks.tracking.runs import client, log_metrics, resolve_tracking_uri

PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc.py")
MODEL_PACKAGE = Path(__file__).parents[2] / "model"
# What the pyfunc needs at load time, pinned to this environment's versions: `mlflow models
# serve` and `load_model` read them; inferring them instead costs seconds per log.
PYFUNC_REQUIREMENTS = ("torch", "tokenizers", "safetensors", "pydantic", "numpy")
# A prompt and a short, seeded sampling: what a caller of the served model sends.
INPUT_EXAMPLE = (["def f(x):"], {"max_new_tokens": 8, "seed": 0})


def log_text_generator(
    run_id: str,
    weights: Path,
    model_config: Path,
    tokenizer: Path,
    name: str = "model",
    metrics: Mapping[str, float] | None = None,
    tokens: Path | None = None,
) -> str:
    """Log the pyfunc text generator (`tasks/tracking/pyfunc.py`) with its artifacts (the
    checkpoint's tokens.json among them when given), and link `metrics` (its evaluation) to
    the logged model.

    The `model/` package is bundled as code, so the logged model loads with nothing of this
    project installed. Returns the model URI (`models:/m-...`) to register.
    """
    from importlib.metadata import version

    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    param_types = {int: DataType.long, float: DataType.double, str: DataType.string}
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec(key, param_types[type(value)], value) for key, value in PARAM_DEFAULTS.items()]),
    )
    mlflow_client = client()
    run = mlflow_client.get_run(run_id)
    # Created explicitly so the model lives in the run's experiment (MLflow would otherwise
    # file it under the process's active experiment, the Default one).
    logged = mlflow_client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id)
    info = Model.log(
        artifact_path=None,
        name=name,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        model_id=logged.model_id,
        python_model=str(PYFUNC_MODEL_CODE),
        artifacts={
            WEIGHTS_ARTIFACT: str(weights),
            CONFIG_ARTIFACT: str(model_config),
            TOKENIZER_ARTIFACT: str(tokenizer),
            **({TOKENS_ARTIFACT: str(tokens)} if tokens is not None else {}),
        },
        code_paths=[str(MODEL_PACKAGE)],
        signature=signature,
        # Shown in the UI and by `mlflow models serve`; MLflow runs the model on it once to check the signature.
        input_example=INPUT_EXAMPLE,
        pip_requirements=[f"{package}=={version(package)}" for package in PYFUNC_REQUIREMENTS],
    )
    if metrics:
        log_metrics(run_id, metrics, model_id=logged.model_id)
    return info.model_uri


def log_checkpoints(run_id: str, stage: str, checkpoints: list[Path]) -> list[str]:
    """Each `step-N` checkpoint as an external logged model of `run_id`, named `<stage>-step-N`:
    MLflow records its step and path, the files stay where they are (no upload). The models
    view then lists a training stage's checkpoints beside its registered models. Returns
    their model ids."""
    experiment = client().get_run(run_id).info.experiment_id
    models = [
        mlflow.create_external_model(
            name=f"{stage}-step-{checkpoint_step(checkpoint)}",
            source_run_id=run_id,
            params={"step": str(checkpoint_step(checkpoint)), "path": str(checkpoint)},
            model_type="checkpoint",
            experiment_id=experiment,
            # MLflow would take the user from MLFLOW_TRACKING_USERNAME, a secret of the server's
            # basic auth; the process's own user names who logged it without leaking one.
            tags={"mlflow.user": getpass.getuser()},
        )
        for checkpoint in checkpoints
    ]
    return [model.model_id for model in models]


def register_version(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """A new version of registered model `name` (created on first use); returns its number."""
    client()  # points the module-level API at the resolved URI
    version = mlflow.register_model(model_uri, name, tags={key: str(value) for key, value in tags.items()})
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, str(value))


def version_for_alias(name: str, alias: str) -> mlflow.entities.model_registry.ModelVersion | None:
    """The version `alias` points at, or None when the model or the alias does not exist yet."""
    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise


def version_aliases(name: str) -> dict[str, list[str]]:
    """Version number -> the aliases pointing at it, of registered model `name` ({} when it does not exist)."""
    try:
        model = client().get_registered_model(name)
    except MlflowException as e:
        if e.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return {}
        raise
    aliases: dict[str, list[str]] = {}
    for alias, version in sorted(model.aliases.items()):
        aliases.setdefault(str(version), []).append(alias)
    return aliases


def find_version(name: str, tag: str, value: str) -> mlflow.entities.model_registry.ModelVersion | None:
    """The newest version of `name` whose tag `tag` equals `value`, if any (the store filters)."""
    found = client().search_model_versions(
        f"name = '{name}' and tags.`{tag}` = '{value}'", max_results=1, order_by=["version_number DESC"]
    )
    return found[0] if found else None


def download_model(model_uri: str) -> Path:
    """Download a logged or registered model; returns the directory holding `MLmodel`."""
    client()
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=tempfile.mkdtemp(prefix="gptflow-model-")
            )
        )
    except MlflowException as e:
        raise UserError(
            f"{model_uri}: no such model in the registry at {resolve_tracking_uri()} ({e.message})"
        ) from None


def model_artifacts(model_dir: Path) -> dict[str, Path]:
    """The pyfunc's artifacts by name (weights, config, tokenizer) inside a downloaded model."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    return {key: model_dir / entry["path"] for key, entry in flavor.get("artifacts", {}).items()}


def load_text_generator(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc of a logged or registered model, ready to `predict(prompts, params=...)`."""
    client()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise UserError(f"{model_uri}: cannot load the model from {resolve_tracking_uri()} ({e.message})") from None


@dataclass
class RegisteredModel:
    """A registered model's GPT and files, and what the registry records of it."""

    model: GPT
    weights: Path
    tokenizer: Path
    tokens: Path | None  # the checkpoint's tokens.json (None for versions logged before it existed)
    tags: dict[str, str]  # the version's tags (lineage, figures), {} for a logged model's URI
    run_id: str | None  # the MLflow run it was logged from


def load_registered_model(model_uri: str) -> RegisteredModel:
    """A registered model's GPT, files and version record, without running its pyfunc code."""
    artifacts = model_artifacts(download_model(model_uri))
    weights = artifacts.get(WEIGHTS_ARTIFACT)
    if weights is None or not weights.is_file():
        raise UserError(f"{model_uri}: not a gptflow text generator (no safetensors weights among its artifacts)")
    version = model_version(model_uri)
    # The pyfunc's artifacts sit side by side with checkpoint names (model.safetensors, config.json).
    return RegisteredModel(
        load_model(weights.parent),
        weights,
        artifacts[TOKENIZER_ARTIFACT],
        artifacts.get(TOKENS_ARTIFACT),
        dict(version.tags) if version else {},
        version.run_id if version else None,
    )


def model_version(model_uri: str) -> mlflow.entities.model_registry.ModelVersion | None:
    """The registry's version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names."""
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return version_for_alias(name, alias)
    if not version.isdigit():
        return None  # a logged model's id (models:/m-...), not a registered version
    return client().get_model_version(name, version)
