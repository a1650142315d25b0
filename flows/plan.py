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
from flows.stages import STAGES, Known, pipeline_steps
from model.device import describe_device
from tasks.core.checkpoint_mirror import has_checkpoints
from tasks.core.storage import resolve_workspace
from tasks.core.workspace import StageDir


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
    """Each step's fingerprint and action, walking the pipeline's steps (flows/stages.py).
    Only manifests (and a checkpoint's config.json) are read, where the workspace keeps them:
    nothing is hashed or downloaded but a `finetune.start_from` checkpoint outside it."""
    workspace = resolve_workspace(config.workspace)
    fingerprints: dict[str, str | None] = {}
    complete: dict[str, StageDir] = {}
    planned: list[PlannedStage] = []
    for step in pipeline_steps(config):
        fp = step.planner(Known(config, fingerprints, complete)) if step.planner else None
        directory = StageDir(workspace, STAGES[step.stage].writes, fp) if fp else None
        fingerprints[step.label] = fp
        if directory and directory.is_complete():
            complete[step.label] = directory
        planned.append(
            PlannedStage(step.label, STAGES[step.stage].writes, fp, stage_action(directory) if directory else "run")
        )
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
