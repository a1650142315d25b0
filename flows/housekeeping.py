"""`gptflow status` and `gptflow clean`: the stage outputs in a workspace.

A stage output is a directory `<workspace>/<stage>/<fingerprint>/`. It is complete when
its manifest is committed. `clean` removes

- incomplete outputs (a stage that failed or was stopped; for a training stage this
  drops the checkpoints a rerun would resume from), and
- with `--keep CONFIG ...`: also complete outputs that none of those configs refers to.
  A config refers to the stage outputs its pipeline would read or write now, the
  fingerprints `gptflow run CONFIG --dry-run` prints.

An output whose lock is held (a stage running right now) is never removed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from flows.config import PipelineConfig
from flows.plan import plan
from tasks.workspace import StageDir

STAGES = ("ingest", "bpe", "shard", "pretrain", "evaluate", "finetune")


@dataclass(frozen=True)
class StageOutput:
    stage: str
    fingerprint: str
    path: Path
    size: int  # bytes on disk
    complete: bool


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def stage_outputs(workspace: Path) -> list[StageOutput]:
    """Every `<stage>/<fingerprint>/` directory, in pipeline order."""
    workspace = Path(workspace).resolve()
    outputs = []
    for stage in STAGES:
        stage_root = workspace / stage
        if not stage_root.is_dir():
            continue
        for path in sorted(p for p in stage_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            directory = StageDir(workspace, stage, path.name)
            outputs.append(StageOutput(stage, path.name, path, directory_size(path), directory.is_complete()))
    return outputs


def referenced(configs: list[PipelineConfig]) -> set[tuple[str, str]]:
    """(stage, fingerprint) of every output these configs' pipelines read or write."""
    return {(step.stage, step.fingerprint) for config in configs for step in plan(config) if step.fingerprint}


def in_use(output: StageOutput) -> bool:
    lock = StageDir(output.path.parents[1], output.stage, output.fingerprint).lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def removable(workspace: Path, keep: list[PipelineConfig]) -> list[StageOutput]:
    """Incomplete outputs; with `keep` configs, also complete ones they do not refer to."""
    kept = referenced(keep)
    return [
        output
        for output in stage_outputs(workspace)
        if (output.stage, output.fingerprint) not in kept and (not output.complete or keep) and not in_use(output)
    ]


def remove(outputs: list[StageOutput]) -> None:
    for output in outputs:
        shutil.rmtree(output.path)
        output.path.with_name(f"{output.fingerprint}.lock").unlink(missing_ok=True)


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
