"""The pipeline's stages and steps, declared once.

A stage is a module `tasks/<stage>.py` that writes `<workspace>/<stage>/<fingerprint>/` (the
registry stage writes to MLflow instead). A step is one use of a stage in the pipeline, named
as its Prefect task is (`evaluate` runs twice: `evaluate-pretrained`, `evaluate-finetuned`).
Each step says which steps' outputs it reads and how its fingerprint follows from the config
and those outputs, the way the stage itself computes it.

Who walks this table: `flows/pipeline.py` records each step's output under its label,
`flows/plan.py` plans every step without building anything (`gptflow run --dry-run`,
`gptflow clean --keep`), `flows/housekeeping.py` lists the workspace by the stages'
directories and `tests/unit/test_layers.py` takes the stage modules from it. The test
`test_the_plan_is_what_the_run_does` (tests/integration/test_pipeline.py) holds the
planned fingerprints to what the pipeline's run wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from model.checkpoint import CONFIG, WEIGHTS
from model.config import GPTConfig
from tasks.bpe import TOKENIZER_FILE, BPEOutput, bpe_fingerprint
from tasks.core.workspace import StageDir, sha256_file
from tasks.evaluate import EvaluateOutput, evaluate_fingerprint, evaluate_inputs
from tasks.finetune import FinetuneOutput, finetune_fingerprint, finetune_inputs
from tasks.ingest import CORPUS_FILE, IngestOutput, find_source_files, ingest_fingerprint, pinned_commit
from tasks.models.sources import find_checkpoint, is_registry_uri
from tasks.pretrain import PretrainOutput, pretrain_fingerprint
from tasks.register import RegisterOutput
from tasks.shard import ShardOutput, shard_fingerprint


@dataclass(frozen=True)
class Stage:
    name: str  # its module tasks/<name>.py and its config section
    output: type  # what its task returns
    writes: str  # its directory in the workspace, or "registry" (MLflow's, not the workspace)


STAGES = {
    stage.name: stage
    for stage in (
        Stage("ingest", IngestOutput, "ingest"),
        Stage("bpe", BPEOutput, "bpe"),
        Stage("shard", ShardOutput, "shard"),
        Stage("pretrain", PretrainOutput, "pretrain"),
        Stage("evaluate", EvaluateOutput, "evaluate"),
        Stage("finetune", FinetuneOutput, "finetune"),
        Stage("register", RegisterOutput, "registry"),
    )
}
WORKSPACE_STAGES = tuple(stage.name for stage in STAGES.values() if stage.writes == stage.name)


@dataclass(frozen=True)
class Known:
    """What planning knows when it reaches a step: every earlier step's fingerprint (None
    when it follows from weights not yet trained) and the completed directories among them."""

    config: PipelineConfig
    fingerprints: Mapping[str, str | None]
    complete: Mapping[str, StageDir]

    def data_ready(self) -> bool:
        return all(label in self.complete for label in ("ingest", "train-tokenizer", "shard"))

    def listed(self, label: str, file: str) -> str:
        return self.complete[label].listed_sha256(file)


# A step's fingerprint as the stage computes it, from the config and what is known; None
# when it depends on an output that does not exist yet (that step then runs).
Planner = Callable[[Known], str | None]


@dataclass(frozen=True)
class Step:
    label: str  # the Prefect task name; the plan's line
    stage: str  # a Stage's name
    reads: tuple[str, ...]  # the labels of the steps whose outputs it reads
    planner: Planner | None  # None: nothing to plan (the registry always runs)


def trained_weights(directory: StageDir) -> tuple[str, GPTConfig]:
    """The sha256 and model config of a completed training stage's final checkpoint, from
    its manifest (nothing hashed)."""
    checkpoint = directory.stored_manifest()["checkpoint"]
    config = GPTConfig.model_validate_json(directory.read_bytes(f"{checkpoint}/{CONFIG}"))
    return directory.listed_sha256(f"{checkpoint}/{WEIGHTS}"), config


def checkpoint_weights(path: Path) -> tuple[str, GPTConfig]:
    """The sha256 and model config of the checkpoint `path` names, as fine-tuning reads it."""
    checkpoint = find_checkpoint(path)
    return sha256_file(checkpoint / WEIGHTS), GPTConfig.model_validate_json((checkpoint / CONFIG).read_text())


def finetune_base(known: Known) -> tuple[str, GPTConfig] | None:
    """The weights fine-tuning starts from: `finetune.start_from`, else pretraining's output.
    A registered model is known only once downloaded: None."""
    start_from = known.config.finetune.start_from
    if start_from is None:
        return trained_weights(known.complete["pretrain"]) if "pretrain" in known.complete else None
    return None if is_registry_uri(start_from) else checkpoint_weights(Path(start_from))


def plan_ingest(known: Known) -> str:
    config = known.config.ingest
    return ingest_fingerprint(config, find_source_files(config), pinned_commit(config))


def plan_bpe(known: Known) -> str | None:
    # With model.init_from the tokenizer's fingerprint holds the pretrained model's digest,
    # known once the model is read: it and every step after it are planned as "run".
    if known.config.model.init_from is not None:
        return None
    return bpe_fingerprint(known.config.bpe, known.fingerprints["ingest"])


def plan_shard(known: Known) -> str | None:
    tokenizer = known.fingerprints["train-tokenizer"]
    return tokenizer and shard_fingerprint(known.config.shard, known.fingerprints["ingest"], tokenizer)


def plan_pretrain(known: Known) -> str | None:
    shards = known.fingerprints["shard"]
    return shards and pretrain_fingerprint(known.config.pretrain, known.config.model, shards)


def evaluation(model_label: str) -> Planner:
    """The planner of the evaluation of `model_label`'s final weights."""

    def plan_evaluation(known: Known) -> str | None:
        if not (known.data_ready() and model_label in known.complete):
            return None
        model_sha256, _ = trained_weights(known.complete[model_label])
        inputs = evaluate_inputs(
            model_sha256,
            known.listed("train-tokenizer", TOKENIZER_FILE),
            known.fingerprints["shard"],
            known.listed("ingest", CORPUS_FILE),
        )
        return evaluate_fingerprint(known.config.evaluate, inputs)

    return plan_evaluation


def plan_finetune(known: Known) -> str | None:
    config = known.config.finetune
    base = finetune_base(known) if known.data_ready() else None
    if base is None:
        return None
    model_sha256, model_config = base
    pairs = sha256_file(config.path) if config.path else known.listed("ingest", CORPUS_FILE)
    # The pipeline's shards share its tokenizer: with replay on, the stage replays them.
    replayed = known.fingerprints["shard"] if config.replay_fraction > 0 else None
    inputs = finetune_inputs(model_sha256, known.listed("train-tokenizer", TOKENIZER_FILE), pairs, replayed)
    return finetune_fingerprint(config, inputs, model_config.block_size)


DATA_STEPS = (
    Step("ingest", "ingest", (), plan_ingest),
    Step("train-tokenizer", "bpe", ("ingest",), plan_bpe),
    Step("shard", "shard", ("ingest", "train-tokenizer"), plan_shard),
)
MODEL_STEPS = (
    Step("pretrain", "pretrain", ("shard",), plan_pretrain),
    Step("evaluate-pretrained", "evaluate", ("pretrain", "train-tokenizer", "shard", "ingest"), evaluation("pretrain")),
)
FINETUNE_STEPS = (
    Step("finetune", "finetune", ("pretrain", "train-tokenizer", "ingest", "shard"), plan_finetune),
    Step("evaluate-finetuned", "evaluate", ("finetune", "train-tokenizer", "shard", "ingest"), evaluation("finetune")),
)
REGISTER_STEP = Step("register-model", "register", ("evaluate-pretrained", "evaluate-finetuned"), None)


def pipeline_steps(config: PipelineConfig) -> tuple[Step, ...]:
    """The steps a run of `config` takes, in order (no fine-tuning with `finetune: null`)."""
    finetuning = FINETUNE_STEPS if config.finetune is not None else ()
    return (*DATA_STEPS, *MODEL_STEPS, *finetuning, REGISTER_STEP)


class StepRecord(BaseModel):
    """What one step of a run did: the directory it wrote or reused."""

    stage: str
    fingerprint: str
    reused: bool

    @classmethod
    def of(cls, output: BaseModel) -> StepRecord:
        """From a stage's output (every workspace stage's has `path`, `fingerprint`, `reused`)."""
        return cls(stage=output.path.parent.name, fingerprint=output.fingerprint, reused=output.reused)
