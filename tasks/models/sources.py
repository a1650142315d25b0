"""Where a model is taken from: a checkpoint directory, the registry, or a Hugging Face model.

A model is named by a path (a checkpoint `step-N/` directory, a `checkpoints/` directory or
a stage directory that holds one: the newest checkpoint is taken) or by an MLflow model
URI, `models:/NAME@ALIAS` or `models:/NAME/VERSION`. Evaluation and fine-tuning get the GPT
and a digest that identifies its weights (for stage fingerprints), checking a registered
model's own tokenizer against the pipeline's (`load_model_source`).

`open_model` also takes a Hugging Face GPT-2 directory or hub name (tasks/models/hf_import.py)
and returns the model with everything needed to prompt it and describe it: its tokenizer,
special ids, prompt format and lineage. `gptflow generate`, `gptflow export` and
`model.init_from` use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model.checkpoint import (
    TOKENIZER,
    WEIGHTS,
    CheckpointTokens,
    PromptFormat,
    latest_checkpoint,
    load_model,
    read_tokens,
)
from model.errors import UserError
from model.gpt import GPT
from model.integrity import sha256_file
from model.special_tokens import SpecialIds, special_ids
from tasks.models.hf_import import is_hf_directory, load_pretrained

REGISTRY_SCHEME = "models:/"
RUN_SCHEME = "runs:/"  # a model logged by a run, `runs:/ID/model`: `gptflow generate` and export take it too
GPTFLOW_CONFIG_KEY = "gptflow"  # config.json of an exported model: {"prompt_format": ...}


@dataclass
class LoadedModel:
    model: GPT
    digest: str  # sha256 of the weights file


@dataclass
class SourceModel:
    """A model with what prompting and describing it takes."""

    model: GPT
    tokenizer: Tokenizer  # special-token text in prompts stays plain text
    special: SpecialIds
    digest: str  # the weights (and, for a Hugging Face model, its tokenizer) by content
    prompt_format: PromptFormat
    lineage: dict[str, str] = field(default_factory=dict)  # what is known of where it came from


def is_registry_uri(spec: str | Path) -> bool:
    return str(spec).startswith(REGISTRY_SCHEME)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` names: itself, or the newest one under it."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for checkpoints in (path, path / "checkpoints"):
        if found := latest_checkpoint(checkpoints):
            return found
    raise UserError(f"{path}: not a checkpoint directory (no {WEIGHTS}, no checkpoints/step-N under it)")


def load_model_source(spec: str | Path, tokenizer: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load the model `spec` names (see the module docstring) to use with `tokenizer`.

    A registered model brings its own tokenizer; it must be the same file, since the
    pipeline's shards and pairs are encoded with `tokenizer`.
    """
    if is_registry_uri(spec):
        from tasks.tracking.registry import load_registered_model  # MLflow: only a registered model needs it

        registered = load_registered_model(str(spec))
        if sha256_file(registered.tokenizer) != sha256_file(tokenizer):
            raise UserError(
                f"{spec}: the model was trained with a different tokenizer than {tokenizer}; "
                "use it with the config (data) it was trained on"
            )
        return LoadedModel(registered.model.to(device), sha256_file(registered.weights))
    checkpoint = find_checkpoint(Path(spec))
    return LoadedModel(load_model(checkpoint, device), sha256_file(checkpoint / WEIGHTS))


def open_model(spec: str) -> SourceModel:
    """The model `spec` names: `models:/...` or `runs:/...`, a checkpoint or stage directory, a
    Hugging Face directory, or a hub name; on the CPU."""
    if is_registry_uri(spec) or spec.startswith(RUN_SCHEME):
        return _registered(spec)
    path = Path(spec).expanduser()
    if path.is_dir() and not is_hf_directory(path):
        return _checkpoint(find_checkpoint(path))
    pretrained = load_pretrained(spec)
    exported = json.loads((path / "config.json").read_text()) if path.is_dir() else {}  # gptflow export's note
    prompt_format = exported.get(GPTFLOW_CONFIG_KEY, {}).get("prompt_format", "document")
    return SourceModel(
        pretrained.model,
        pretrained.tokenizer,
        pretrained.special,
        pretrained.digest,
        prompt_format,
        {"source": pretrained.origin},
    )


def plain_text_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer.json with special-token text in prompts encoded as plain text (model/special_tokens.py)."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _checkpoint(checkpoint: Path) -> SourceModel:
    tokens = read_tokens(checkpoint)
    lineage = {"checkpoint": str(checkpoint)}
    manifest = checkpoint.parent.parent / "manifest.json"  # <stage>/<fingerprint>/checkpoints/step-N
    if manifest.is_file():
        committed = json.loads(manifest.read_text())
        stage = checkpoint.parent.parent.parent.name
        lineage[f"{stage}_fingerprint"] = committed.get("fingerprint", "unknown")
        lineage |= {f"{name}_input": value for name, value in committed.get("inputs", {}).items()}
        lineage |= {name: f"{value:.4g}" for name, value in committed.get("metrics", {}).items()}
    return SourceModel(
        load_model(checkpoint),
        plain_text_tokenizer(checkpoint / TOKENIZER),
        tokens.special_ids,
        sha256_file(checkpoint / WEIGHTS),
        tokens.prompt_format,
        lineage,
    )


def _registered(uri: str) -> SourceModel:
    # Imported here: MLflow takes seconds to import, and only a models:/ or runs:/ source needs it.
    from tasks.tracking.registry import load_registered_model

    registered = load_registered_model(uri)
    tokenizer = plain_text_tokenizer(registered.tokenizer)
    if registered.tokens is not None:
        tokens = CheckpointTokens.model_validate_json(registered.tokens.read_text())
        special, prompt_format = tokens.special_ids, tokens.prompt_format
    else:  # logged before checkpoints carried tokens.json: a pretrained model
        special, prompt_format = special_ids(tokenizer, str(registered.tokenizer)), "document"
    lineage = {"model_uri": uri, **({"mlflow_run_id": registered.run_id} if registered.run_id else {})}
    return SourceModel(
        registered.model,
        tokenizer,
        special,
        sha256_file(registered.weights),
        prompt_format,
        lineage | registered.tags,
    )
