"""What `gptflow run CONFIG --dry-run` prints: the resolved config, the devices the run would
use on this machine and, per stage, run or skip.

Nothing is built: each stage's fingerprint is computed the way the stage computes it, from
the config and its inputs' fingerprints, and its directory is checked for a committed
manifest. The data stages' fingerprints follow from the config alone; a model stage's
depends on the weights it reads, so it is known only once the stage before it has
completed (otherwise that stage runs, and so does everything after it).
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from flows.pipeline_config import PipelineConfig
from model.checkpoint import CONFIG, WEIGHTS
from model.config import GPTConfig
from model.device import describe_device
from tasks.bpe import TOKENIZER_FILE, bpe_fingerprint
from tasks.core.checkpoint_mirror import has_checkpoints
from tasks.core.storage import resolve_workspace
from tasks.core.workspace import StageDir, sha256_file
from tasks.evaluate import evaluate_fingerprint, evaluate_inputs
from tasks.finetune import finetune_fingerprint, finetune_inputs
from tasks.ingest import CORPUS_FILE, find_source_files, ingest_fingerprint
from tasks.pretrain import pretrain_fingerprint
from tasks.shard import shard_fingerprint


@dataclass(frozen=True)
class PlannedStage:
    label: str  # the Prefect task name, e.g. "evaluate-pretrained"
    stage: str  # the workspace directory it writes
    fingerprint: str | None  # None: decided by an earlier stage's output
    action: str  # "skip", "run", "resume"

    def describe(self) -> str:
        where = self.fingerprint or "(after the stages before it)"
        return f"{self.label:<24} {self.action:<7} {self.stage}/{where}"


def stage_action(stage: StageDir) -> str:
    if stage.is_complete():
        return "skip"
    # A training stage left checkpoints behind: the rerun continues from the newest one.
    return "resume" if has_checkpoints(stage) else "run"


def plan(config: PipelineConfig) -> list[PlannedStage]:
    """Each stage's fingerprint and action. Only manifests (and a checkpoint's config.json)
    are read, where the workspace keeps them: nothing is hashed or downloaded."""
    workspace = resolve_workspace(config.workspace)
    planned: list[PlannedStage] = []

    def add(label: str, stage: str, fp: str | None) -> StageDir | None:
        """Record the stage; return its directory when it is complete (its output is usable)."""
        directory = StageDir(workspace, stage, fp) if fp else None
        planned.append(PlannedStage(label, stage, fp, stage_action(directory) if directory else "run"))
        return directory if directory and directory.is_complete() else None

    corpus_fp = ingest_fingerprint(config.ingest, find_source_files(config.ingest))
    # With model.init_from the tokenizer stage's fingerprint holds the pretrained model's digest,
    # known once the model is read: it and every stage after it are planned as "run".
    tokenizer_fp = bpe_fingerprint(config.bpe, corpus_fp) if config.model.init_from is None else None
    shards_fp = shard_fingerprint(config.shard, corpus_fp, tokenizer_fp) if tokenizer_fp else None
    corpus_dir = add("ingest", "ingest", corpus_fp)
    tokenizer_dir = add("train-tokenizer", "bpe", tokenizer_fp)
    shards_dir = add("shard", "shard", shards_fp)
    pretrain_fp = pretrain_fingerprint(config.pretrain, config.model, shards_fp) if shards_fp else None
    pretrained = add("pretrain", "pretrain", pretrain_fp)

    data_ready = corpus_dir and tokenizer_dir and shards_dir

    def model_fingerprint(model_dir: StageDir | None, stage_fingerprint) -> str | None:
        """A stage reading `model_dir`'s final weights; None until those weights exist."""
        if not (model_dir and data_ready):
            return None
        checkpoint = model_dir.stored_manifest()["checkpoint"]
        model_config = GPTConfig.model_validate_json(model_dir.read_bytes(f"{checkpoint}/{CONFIG}"))
        return stage_fingerprint(model_dir.listed_sha256(f"{checkpoint}/{WEIGHTS}"), model_config)

    def evaluation(model_sha256: str, model_config: GPTConfig) -> str:
        inputs = evaluate_inputs(
            model_sha256, tokenizer_dir.listed_sha256(TOKENIZER_FILE), shards_fp, corpus_dir.listed_sha256(CORPUS_FILE)
        )
        return evaluate_fingerprint(config.evaluate, inputs)

    def finetuning(model_sha256: str, model_config: GPTConfig) -> str:
        pairs = sha256_file(config.finetune.path) if config.finetune.path else corpus_dir.listed_sha256(CORPUS_FILE)
        # The pipeline's shards share its tokenizer: with replay on, the stage replays them.
        replayed = shards_fp if config.finetune.replay_fraction > 0 else None
        inputs = finetune_inputs(model_sha256, tokenizer_dir.listed_sha256(TOKENIZER_FILE), pairs, replayed)
        return finetune_fingerprint(config.finetune, inputs, model_config.block_size)

    add("evaluate-pretrained", "evaluate", model_fingerprint(pretrained, evaluation))
    if config.finetune is not None:
        finetuned = add("finetune", "finetune", model_fingerprint(pretrained, finetuning))
        add("evaluate-finetuned", "evaluate", model_fingerprint(finetuned, evaluation))
    planned.append(PlannedStage("register-model", "registry", None, "run"))
    return planned


def describe_devices(config: PipelineConfig) -> str:
    """Each device setting and what it resolves to here; one this machine lacks is shown, not
    refused: the run (on its own machine) checks it."""
    settings = {"device": config.device, "pretrain.device": config.pretrain.device}
    if config.finetune is not None:
        settings["finetune.device"] = config.finetune.device
    return "\n".join(f"{field:<16} {describe_device(name, field)}" for field, name in settings.items())


def describe_plan(config: PipelineConfig) -> str:
    resolved = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    stages = "\n".join(stage.describe() for stage in plan(config))
    return (
        f"# resolved config\n{resolved}\n# devices on this machine\n{describe_devices(config)}\n\n"
        f"# stages (workspace {resolve_workspace(config.workspace)})\n{stages}\n"
    )
