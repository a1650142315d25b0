"""`gptflow status` and `gptflow clean`: the stage outputs in a workspace.

A stage output is a directory `<workspace>/<stage>/<fingerprint>/`. It is complete when
its manifest is committed. `clean` removes

- incomplete outputs (a stage that failed or was stopped; for a training stage this
  drops the checkpoints a rerun would resume from), and
- with `--keep CONFIG ...`: also complete outputs that none of those configs refers to.
  A config refers to the stage outputs its pipeline would read or write now, the
  fingerprints `gptflow run CONFIG --dry-run` prints.

An output whose lock is held (a stage running right now) is never removed. The workspace
may be an `s3://` URI: outputs are then listed and removed in the bucket (and in this
machine's cache), and an incomplete one written to in the last hour is left alone, since
a build on another machine holds no lock here.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import Timeout

from flows.pipeline_config import PipelineConfig
from flows.plan import plan
from flows.stages import WORKSPACE_STAGES
from tasks.core.storage import RemoteStore, is_remote, resolve_workspace
from tasks.core.workspace import MANIFEST, StageDir

# An incomplete remote output changed within this long may be another machine's build
# (uploading its commit, or mirroring training checkpoints): `clean` leaves it.
REMOTE_IDLE_SECONDS = 3600


@dataclass(frozen=True)
class StoredOutput:
    stage: str
    fingerprint: str
    location: Path | str  # the directory, or its URI in a remote workspace
    size: int  # bytes on disk, or in the bucket
    complete: bool
    modified: float  # newest file's modification time (seconds since the epoch)


def local_outputs(workspace: Path, stage: str) -> Iterator[StoredOutput]:
    stage_root = workspace / stage
    if not stage_root.is_dir():
        return
    for path in sorted(p for p in stage_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [(f.stat().st_size, f.stat().st_mtime) for f in path.rglob("*") if f.is_file() and not f.is_symlink()]
        yield StoredOutput(
            stage,
            path.name,
            path,
            sum(size for size, _ in files),
            (path / MANIFEST).is_file(),
            max((mtime for _, mtime in files), default=path.stat().st_mtime),
        )


def remote_outputs(workspace: str, stage: str) -> Iterator[StoredOutput]:
    """The stage's outputs in the bucket, from one listing of its prefix."""
    store, by_fingerprint = RemoteStore(f"{workspace}/{stage}"), defaultdict(list)
    for info in store.files():
        fingerprint, _, relative = info.path.removeprefix(f"{store.root}/").partition("/")
        if relative:
            by_fingerprint[fingerprint].append((relative, info))
    for fingerprint, files in sorted(by_fingerprint.items()):
        yield StoredOutput(
            stage,
            fingerprint,
            f"{workspace}/{stage}/{fingerprint}",
            sum(info.size for _, info in files),
            any(relative == MANIFEST for relative, _ in files),
            max(info.mtime.timestamp() for _, info in files),
        )


def stage_outputs(workspace: Path | str) -> list[StoredOutput]:
    """Every `<stage>/<fingerprint>/` directory, in pipeline order."""
    workspace = resolve_workspace(workspace)
    outputs = remote_outputs if is_remote(workspace) else local_outputs
    return [output for stage in WORKSPACE_STAGES for output in outputs(workspace, stage)]


def referenced(configs: list[PipelineConfig]) -> set[tuple[str, str]]:
    """(stage, fingerprint) of every output these configs' pipelines read or write."""
    return {(step.stage, step.fingerprint) for config in configs for step in plan(config) if step.fingerprint}


def stage_dir(output: StoredOutput) -> StageDir:
    workspace = output.location.rsplit("/", 2)[0] if isinstance(output.location, str) else output.location.parents[1]
    return StageDir(workspace, output.stage, output.fingerprint)


def in_use(output: StoredOutput) -> bool:
    """A stage being built here holds its lock. Another machine's build of a remote stage
    cannot be seen, so an incomplete remote output written to recently counts as in use."""
    if isinstance(output.location, str) and not output.complete and time.time() - output.modified < REMOTE_IDLE_SECONDS:
        return True
    lock = stage_dir(output).lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def removable(workspace: Path | str, keep: list[PipelineConfig]) -> list[StoredOutput]:
    """Incomplete outputs; with `keep` configs, also complete ones they do not refer to."""
    kept = referenced(keep)
    return [
        output
        for output in stage_outputs(workspace)
        if (output.stage, output.fingerprint) not in kept and (not output.complete or keep) and not in_use(output)
    ]


def remove(outputs: list[StoredOutput]) -> None:
    """Delete the outputs, and for a remote one its copy in this machine's cache too."""
    for output in outputs:
        directory = stage_dir(output)
        if remote := directory.remote:
            remote.delete()
        shutil.rmtree(directory.path, ignore_errors=True)
        directory.path.with_name(f"{output.fingerprint}.lock").unlink(missing_ok=True)


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
