"""Stage: register the pipeline's final model in MLflow and decide whether it becomes champion.

The model is logged as the pyfunc text generator (`tasks/tracking/pyfunc.py`) and registered
as a new version of `name`, tagged with its lineage (data and tokenizer fingerprints, the
project's git commit, the evaluation data it was scored on). Every new version gets the
alias `candidate`. `champion` moves to it only when it beats the current champion on
`gate_metric` over the same evaluation data: the champion's recorded figure is used when
it was computed on exactly that data, otherwise the champion is evaluated again here. The
first version becomes champion. The decision and both figures are logged on the stage's
run and as tags of the new version.
"""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.checkpoint import CONFIG, TOKENS, WEIGHTS, read_tokens
from model.data import ShardManifest
from model.device import resolve_device
from model.errors import UserError
from tasks import tracking
from tasks.bpe import load_tokenizer
from tasks.core.workspace import fingerprint, sha256_file
from tasks.evaluate import EvaluateConfig, document_figures, evaluate_model, evaluate_settings
from tasks.evaluate_benchmarks import (
    BenchmarkConfig,
    benchmark_figures,
    is_benchmark_figure,
    score_names,
    source_digests,
)
from tasks.evaluate_benchmarks import lower_is_better as benchmark_lower_is_better
from tasks.tracking.stage_run import stage_run

CANDIDATE, CHAMPION = "candidate", "champion"
WEIGHTS_TAG = "weights_sha256"
PROMPT_FORMAT_TAG = "prompt_format"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# The evaluation figures a gate can compare (tasks/evaluate.py), and whether lower is better;
# a benchmark's scores too (`<name>_acc`, `<name>_acc_norm`, `<name>_perplexity`: tasks/evaluate_benchmarks.py).
GATE_METRICS = {
    f"{figures}_{name}": name != "accuracy"
    for figures in ("val", "doc")
    for name in ("loss", "perplexity", "bits_per_byte", "accuracy")
}


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate_metric: str = Field(
        "val_bits_per_byte",
        description=(
            "evaluation figure that decides champion; doc_* figures also compare models with different tokenizers"
        ),
    )

    @field_validator("gate_metric")
    @classmethod
    def _comparable_figure(cls, name: str) -> str:
        # Found at load time: a misspelt figure would otherwise keep the champion forever.
        if name not in GATE_METRICS and not is_benchmark_figure(name):
            raise ValueError(
                f"{name!r} is not a figure a gate can compare; one of {', '.join(GATE_METRICS)}, "
                "or a benchmark's <name>_acc, <name>_acc_norm, <name>_perplexity"
            )
        return name

    @property
    def lower_is_better(self) -> bool:
        """Which way the gate figure wins: accuracy up, the others (losses, perplexities) down."""
        if self.gate_metric in GATE_METRICS:
            return GATE_METRICS[self.gate_metric]
        return benchmark_lower_is_better(self.gate_metric)


@dataclass
class EvalData:
    """What the gate scores on: the final evaluation's settings and inputs."""

    config: EvaluateConfig
    shards: Path
    corpus: Path

    def fingerprint(self) -> str:
        settings = self.config.model_dump(include={"stride", "max_documents", "max_windows"})
        inputs = {"shards": sha256_file(self.shards / "manifest.json"), "corpus": sha256_file(self.corpus)}
        if self.config.benchmarks:  # only then: the data of a gate without benchmarks keeps its fingerprint
            settings["benchmarks"] = evaluate_settings(self.config)["benchmarks"]
            inputs |= source_digests(self.config.benchmarks)
        return fingerprint("gate", settings, inputs, format_version=1)


@dataclass
class RegisterOutput:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    champion_version: str
    promoted: bool
    decision: str
    candidate_value: float
    champion_value: float | None
    judged: bool = True  # False when the weights were already registered: no new version, no gate


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    decision: str  # in words, for the run's and the version's tags


def decide_champion(
    gate_metric: str,
    lower_is_better: bool,
    version: str,
    candidate_value: float,
    champion_version: str | None,
    champion_value: float | None,
) -> GateDecision:
    """Whether the candidate `version` becomes champion, judged on `gate_metric`.

    `champion_version` is None when there is no champion yet (the candidate becomes the
    first); `champion_value` is None when the champion's figure is not comparable (another
    tokenizer or a shorter context on a token-level figure): the champion then stays. A tie
    keeps the champion.
    """
    if champion_version is None:
        return GateDecision(True, f"version {version} is the first champion")
    if champion_value is None:
        return GateDecision(
            False,
            (
                f"champion version {champion_version} kept: its tokenizer or context differs from the candidate's, "
                f"so {gate_metric} is not comparable (gate on doc_bits_per_byte to compare such models)"
            ),
        )
    promoted = candidate_value < champion_value if lower_is_better else candidate_value > champion_value
    verb = "replaces" if promoted else "does not beat"
    return GateDecision(
        promoted,
        (
            f"version {version} {verb} champion version {champion_version}: "
            f"{gate_metric} {candidate_value:.4f} vs {champion_value:.4f}"
        ),
    )


def git_commit() -> str:
    """The project's commit, `-dirty` when the tree has changes; "unknown" outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gated_benchmark(gate_metric: str, benchmarks: list[BenchmarkConfig]) -> BenchmarkConfig | None:
    """The benchmark whose figure `gate_metric` is, if it is one."""
    return next((benchmark for benchmark in benchmarks if gate_metric in score_names(benchmark)), None)


CHAMPION_STAGE = "register champion"  # what the re-evaluation's progress lines start with


def champion_figure(
    config: RegisterConfig, champion_uri: str, tokenizer: Path, eval_data: EvalData, device: str = "auto"
) -> float | None:
    """The champion's `gate_metric` on `eval_data`, computed now on `device` (the pipeline's
    setting); None if it cannot be compared. Each phase's progress is shown as CHAMPION_STAGE's."""
    champion = tracking.load_registered_model(champion_uri)
    model, champion_tokenizer = champion.model.to(resolve_device(device)), champion.tokenizer
    tok = load_tokenizer(champion_tokenizer)
    if benchmark := gated_benchmark(config.gate_metric, eval_data.config.benchmarks):
        # Benchmarks are text: each model reads them with its own tokenizer and context.
        return benchmark_figures(model, tok, benchmark, eval_data.config.batch_size, CHAMPION_STAGE).get(
            config.gate_metric
        )
    window = ShardManifest.read(eval_data.shards).seq_len
    if sha256_file(champion_tokenizer) == sha256_file(tokenizer) and window <= model.config.block_size:
        figures = evaluate_model(model, tok, eval_data.config, eval_data.shards, eval_data.corpus, CHAMPION_STAGE)
    else:
        # The val windows are token ids of the candidate's tokenizer, `seq_len` tokens long:
        # a champion scores them only with that tokenizer and a context that holds a window.
        # The doc_* figures need only the corpus text, read with each model's own tokenizer
        # and context.
        figures = document_figures(model, tok, eval_data.config, eval_data.corpus, CHAMPION_STAGE)
    return figures.get(config.gate_metric)


def reuse_version(name: str, number: str, candidate_value: float, run_id: str) -> RegisterOutput:
    """A rerun whose final weights are already registered: no new version; it becomes the
    candidate again, and champion stays (the gate judged these weights when they were registered)."""
    tracking.set_alias(name, CANDIDATE, number)
    champion = tracking.version_for_alias(name, CHAMPION)
    decision = f"version {number} already holds these weights; nothing new registered"
    tracking.set_tags(run_id, {"gate.decision": decision, "registered_version": number})
    champion_version = str(champion.version) if champion else ""
    return RegisterOutput(
        name, number, f"models:/{name}/{number}", champion_version, False, decision, candidate_value, None, judged=False
    )


def run_register(
    config: RegisterConfig,
    name: str,
    checkpoint: Path,
    tokenizer: Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    eval_data: EvalData,
    run_id: str,
    device: str = "auto",
) -> RegisterOutput:
    """Log, register and gate the model in `checkpoint`; `metrics` is its final evaluation.

    `lineage` (data and tokenizer fingerprints, ...) becomes version tags; `run_id` is the
    MLflow run the model is logged under; a champion evaluated again runs on `device`.
    """
    if config.gate_metric not in metrics:
        raise UserError(
            f"register.gate_metric: {config.gate_metric!r} is not an evaluation figure; one of {sorted(metrics)}"
        )
    candidate_value = metrics[config.gate_metric]
    weights_sha = sha256_file(checkpoint / WEIGHTS)
    if existing := tracking.find_version(name, WEIGHTS_TAG, weights_sha):
        return reuse_version(name, str(existing.version), candidate_value, run_id)
    eval_fingerprint = eval_data.fingerprint()
    # A stage's checkpoint says how it is prompted (tokens.json); a bare one is a pretrained model.
    tokens = checkpoint / TOKENS if (checkpoint / TOKENS).is_file() else None
    prompt_format = read_tokens(checkpoint).prompt_format if tokens else "document"
    logged_uri = tracking.log_text_generator(
        run_id, checkpoint / WEIGHTS, checkpoint / CONFIG, tokenizer, metrics=metrics, tokens=tokens
    )
    version = tracking.register_version(
        logged_uri,
        name,
        tags={
            **lineage,
            "git_commit": git_commit(),
            WEIGHTS_TAG: weights_sha,
            PROMPT_FORMAT_TAG: prompt_format,  # "pair": fine-tuned, prompted as `prompt <|sep|>`
            "eval_data_fingerprint": eval_fingerprint,
            config.gate_metric: candidate_value,
        },
    )
    tracking.set_alias(name, CANDIDATE, version)

    champion = tracking.version_for_alias(name, CHAMPION)
    champion_value: float | None = None
    if champion is not None:
        recorded = champion.tags.get(config.gate_metric)
        if champion.tags.get("eval_data_fingerprint") == eval_fingerprint and recorded is not None:
            champion_value = float(recorded)
        else:
            champion_value = champion_figure(config, f"models:/{name}/{champion.version}", tokenizer, eval_data, device)
    gate = decide_champion(
        config.gate_metric,
        config.lower_is_better,
        version,
        candidate_value,
        str(champion.version) if champion else None,
        champion_value,
    )
    if gate.promoted:
        tracking.set_alias(name, CHAMPION, version)
    champion_version = version if gate.promoted else str(champion.version)  # no champion: promoted

    output = RegisterOutput(
        name,
        version,
        f"models:/{name}/{version}",
        champion_version,
        gate.promoted,
        gate.decision,
        candidate_value,
        champion_value,
    )
    gate_figures = {
        "gate_candidate": candidate_value,
        **({"gate_champion": champion_value} if champion_value is not None else {}),
    }
    tracking.log_metrics(run_id, gate_figures)
    tracking.set_tags(run_id, {"gate.decision": gate.decision, "registered_version": version})
    tracking.log_dict(
        run_id,
        {**asdict(output), "gate_metric": config.gate_metric, "lower_is_better": config.lower_is_better},
        "gate.json",
    )
    tracking.set_version_tags(name, version, {"gate_decision": gate.decision})
    return output


@task(name="register-model", cache_policy=NO_CACHE)
def register_task(
    config: RegisterConfig,
    name: str,
    checkpoint: Path,
    tokenizer: Path,
    metrics: dict[str, float],
    lineage: dict[str, str],
    eval_data: EvalData,
    parent_run_id: str,
    device: str = "auto",
) -> RegisterOutput:
    """`run_register` in a nested MLflow run; the decision also tagged on the pipeline's run."""
    with stage_run(parent_run_id, "register", {"register": config.model_dump(), "name": name}) as stage:
        output = run_register(config, name, checkpoint, tokenizer, metrics, lineage, eval_data, stage.run_id, device)
    tracking.set_tags(parent_run_id, {"registered_version": output.version, "gate.decision": output.decision})
    return output
