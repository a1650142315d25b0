"""What the two training stages (pretrain, finetune) share: their config's split into what
decides the weights and what only decides how the run executes, their output, and the
reuse / resume / commit cycle of their stage directory.

A training stage's directory is committed only when training finished: a directory with
checkpoints but no manifest is a run that stopped, and the next run with the same
fingerprint continues from its newest checkpoint (`resume: false` starts over instead).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from model.checkpoint import CONFIG, WEIGHTS
from model.train import Runtime, TrainConfig
from tasks.core.workspace import StageDir, sha256_file, write_json_atomic

METRICS_FILE = "metrics.json"


def run_only_fields(config_type: type[BaseModel]) -> set[str]:
    """The fields of `config_type` marked `RUN_ONLY` (model/config.py), inherited ones included:
    they decide how a run executes, not its weights, and stay out of the fingerprint, so
    changing them reuses or resumes the same stage directory."""
    return {name for name, field in config_type.model_fields.items() if (field.json_schema_extra or {}).get("run_only")}


class TrainingStageConfig(TrainConfig):
    """The engine's TrainConfig as a stage's config; subclasses add the stage's own fields."""

    def train_config(self) -> TrainConfig:
        """The engine's part of the config."""
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))

    def settings(self) -> dict[str, Any]:
        """What decides the weights (the fingerprint's config): every field but the run-only ones."""
        return self.model_dump(mode="json", exclude=run_only_fields(type(self)))


class TrainedOutput(BaseModel):
    path: Path  # the stage directory
    fingerprint: str
    checkpoint: Path  # the final checkpoint, a `step-N/` directory
    metrics: dict[str, float]
    reused: bool = False  # True when a verified earlier run was found
    runtime: Runtime | None = None  # where this call trained (None when reused)


class TrainedManifest(BaseModel):
    """A training stage's manifest.json: the final checkpoint, its figures and the files to verify."""

    format: int
    fingerprint: str
    inputs: dict[str, str]
    checkpoint: str  # relative to the stage directory
    metrics: dict[str, float | int]  # ints stay ints: the manifest's bytes do not change
    files: list[dict[str, str]]  # path and sha256 of each file listed


class Trained(BaseModel):
    """What a training stage's `train` step returns to `train_once`."""

    checkpoint: Path
    metrics: dict[str, float | int]
    files: list[str]  # files of the stage directory to list besides metrics.json and the checkpoint
    runtime: Runtime  # where it trained: device, its name, precision, MFU peak


OutputT = TypeVar("OutputT", bound=TrainedOutput)


def train_once(
    stage: StageDir,
    output_type: type[OutputT],
    format_version: int,
    inputs: dict[str, str],
    resume: bool,
    train: Callable[[], Trained],
) -> OutputT:
    """Reuse the committed run of `stage`, or run `train()` (resuming what an earlier attempt
    left unless `resume` is off) and commit: metrics.json, then the manifest last."""
    with stage.lock():
        if stage.is_complete():
            manifest = TrainedManifest.model_validate(stage.read_manifest())
            return output_type(
                path=stage.path,
                fingerprint=stage.fingerprint,
                checkpoint=stage.path / manifest.checkpoint,
                metrics=manifest.metrics,
                reused=True,
            )
        if not resume:
            stage.reset()
        stage.path.mkdir(parents=True, exist_ok=True)  # not reset: its checkpoints are the resume point
        trained = train()
        write_json_atomic(stage.path / METRICS_FILE, trained.metrics)
        checkpoint = trained.checkpoint.relative_to(stage.path).as_posix()
        listed = [*trained.files, METRICS_FILE, f"{checkpoint}/{WEIGHTS}", f"{checkpoint}/{CONFIG}"]
        manifest = TrainedManifest(
            format=format_version,
            fingerprint=stage.fingerprint,
            inputs=inputs,
            checkpoint=checkpoint,
            metrics=trained.metrics,
            files=[{"path": name, "sha256": sha256_file(stage.path / name)} for name in listed],
        )
        stage.commit(manifest.model_dump())
    return output_type(
        path=stage.path,
        fingerprint=stage.fingerprint,
        checkpoint=trained.checkpoint,
        metrics=trained.metrics,
        runtime=trained.runtime,
    )
