"""Training checkpoints of a stage in an `s3://` workspace, kept in the bucket as well.

Training writes checkpoints to the stage's local directory (`model/` works on local
paths). In a remote workspace, a mirror thread uploads each new complete `step-N` to
`<stage>/checkpoints/step-N/` and then an empty `step-N.complete` object: S3 has no
rename, so that marker, written last, is what makes a remote checkpoint usable. Steps that
training pruned locally (`keep_checkpoints`) are deleted from the bucket too, marker first.

Before training, the newest complete remote checkpoint is downloaded when it is newer than
the newest local one, so a stage interrupted on one machine resumes on another.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from model.checkpoint import checkpoint_dirs, latest_checkpoint
from model.errors import UserError
from tasks.core.periodic import repeating
from tasks.core.storage import RemoteStore
from tasks.core.workspace import StageDir

CHECKPOINTS = "checkpoints"
MARKER = ".complete"
SYNC_SECONDS = 10.0


def step_of(name: str) -> int:
    return int(name.removeprefix("step-"))


def remote_steps(remote: RemoteStore) -> dict[str, list[str]]:
    """Complete remote checkpoints: `step-N` -> its files (relative to the stage)."""
    files = [info.path.removeprefix(remote.root + "/") for info in remote.files()]
    complete = {
        name.split("/")[1].removesuffix(MARKER)
        for name in files
        if name.startswith(f"{CHECKPOINTS}/") and name.endswith(MARKER)
    }
    return {step: [name for name in files if name.startswith(f"{CHECKPOINTS}/{step}/")] for step in complete}


def pull_newest(stage: StageDir) -> Path | None:
    """Download the newest complete remote checkpoint if the local directory lacks a newer one."""
    remote, checkpoints = stage.remote, stage.path / CHECKPOINTS
    steps = remote_steps(remote)
    if not steps:
        return None
    newest = max(steps, key=step_of)
    local = latest_checkpoint(checkpoints)
    if local is not None and step_of(local.name) >= step_of(newest):
        return None
    # Named like a checkpoint that training was writing: if this dies half way, the next
    # save clears it, and nothing reads it.
    tmp = checkpoints / f".{newest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in steps[newest]:
        target = tmp / name.removeprefix(f"{CHECKPOINTS}/{newest}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        remote.download(name, target)
    shutil.rmtree(checkpoints / newest, ignore_errors=True)
    os.replace(tmp, checkpoints / newest)
    return checkpoints / newest


class Mirror:
    """Uploads the stage's new local checkpoints and drops the pruned ones from the bucket."""

    def __init__(self, stage: StageDir):
        self.remote, self.checkpoints = stage.remote, stage.path / CHECKPOINTS
        # Only steps present here are ever deleted from the bucket: one this machine does
        # not have (written elsewhere) is not its to prune.
        self.uploaded = set(remote_steps(self.remote)) & {path.name for path in checkpoint_dirs(self.checkpoints)}

    def sync(self) -> None:
        local = {path.name: path for path in checkpoint_dirs(self.checkpoints)}
        for name in sorted(local.keys() - self.uploaded, key=step_of):
            try:
                files = [path for path in local[name].rglob("*") if path.is_file()]
                for path in files:
                    self.remote.upload(path, f"{CHECKPOINTS}/{name}/{path.relative_to(local[name]).as_posix()}")
            except FileNotFoundError:  # pruned by training while being uploaded
                continue
            self.remote.put_empty(f"{CHECKPOINTS}/{name}{MARKER}")
            self.uploaded.add(name)
        for name in sorted(self.uploaded - local.keys(), key=step_of):
            self.remote.delete(f"{CHECKPOINTS}/{name}{MARKER}")
            self.remote.delete(f"{CHECKPOINTS}/{name}")
            self.uploaded.discard(name)


@contextmanager
def mirrored_checkpoints(stage: StageDir, resume: bool = True) -> Iterator[None]:
    """Around a training run of `stage`: resume from the bucket's newest checkpoint (or,
    without `resume`, delete the bucket's checkpoints), keep uploading new ones while
    training, and upload the last ones however training ends. Nothing to do in a local
    workspace."""
    if stage.remote is None:
        yield
        return
    if resume:
        pull_newest(stage)
    else:
        stage.remote.delete(CHECKPOINTS)
    mirror = Mirror(stage)
    try:
        # UserError: the bucket briefly away; training goes on and the next pass retries.
        with repeating(mirror.sync, SYNC_SECONDS, "checkpoint mirror", forgiven=UserError):
            yield
    finally:
        mirror.sync()


def has_checkpoints(stage: StageDir) -> bool:
    """Whether a rerun of the training stage would resume rather than start over."""
    if checkpoint_dirs(stage.path / CHECKPOINTS):
        return True
    return stage.remote is not None and bool(remote_steps(stage.remote))
