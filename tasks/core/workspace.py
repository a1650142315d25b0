"""Stage directories, fingerprints and manifests: the contract between stages.

Every stage writes into `<workspace>/<stage>/<fingerprint>/`. The fingerprint hashes what
changes the stage's result (its config, the fingerprints of its inputs, a format version),
so the same inputs always land in the same directory and a changed one gets a new
directory. `manifest.json` is written last and is the commit marker: a directory without
one is incomplete and is rebuilt; a directory with one is verified (sha256 of each file it
lists) and reused.

The workspace may also be an `s3://bucket/prefix` URI (tasks/core/storage.py). A stage then
builds in a local cache directory (`StageDir.path`, so stages and `model/` always work on
local paths); `commit` uploads every file the manifest lists, then the manifest last,
and that remote manifest is the commit marker: files without one are ignored and
overwritten by the next build. Reusing a remote stage downloads what the local cache
lacks, checking each file against the manifest's sha256. The lock only guards builds on
one machine: two machines may build the same remote stage at once, and the last
manifest uploaded wins (the outputs are deterministic, so both are the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from filelock import FileLock
from pydantic import BaseModel

from model.errors import UserError
from model.integrity import MANIFEST, inside, sha256_file, verify_files  # noqa: F401 (re-exported)
from tasks.core.storage import RemoteStore, is_remote, resolve_workspace


def fingerprint(stage: str, config: dict[str, Any], inputs: dict[str, str], format_version: int) -> str:
    """A short, stable hash of everything that decides a stage's output."""
    payload = {"stage": stage, "format": format_version, "config": config, "inputs": inputs}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


@dataclass(frozen=True)
class StageDir:
    """`<workspace>/<stage>/<fingerprint>/` and the operations on it.

    `workspace` is a local directory or an `s3://` URI; `path` is always local (for a
    remote workspace, the stage's copy in the local cache).
    """

    workspace: Path | str
    stage: str
    fingerprint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "workspace", resolve_workspace(self.workspace))

    @property
    def remote(self) -> RemoteStore | None:
        return RemoteStore(f"{self.workspace}/{self.stage}/{self.fingerprint}") if is_remote(self.workspace) else None

    @property
    def location(self) -> Path | str:
        """Where the committed stage lives: `path`, or its URI in a remote workspace."""
        return f"{self.workspace}/{self.stage}/{self.fingerprint}" if is_remote(self.workspace) else self.path

    @property
    def path(self) -> Path:
        if remote := self.remote:
            return remote.local_cache()
        return self.workspace / self.stage / self.fingerprint

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def lock(self) -> FileLock:
        """An inter-process lock so two runs on this machine never build the stage at once."""
        lock_path = self.path.parent / f"{self.fingerprint}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_path))

    def is_complete(self) -> bool:
        if remote := self.remote:
            return remote.exists(MANIFEST)
        return self.manifest_path.is_file()

    def read_manifest(self, verify: bool = True) -> dict[str, Any]:
        """The committed manifest; with `verify`, every listed file must match its sha256.

        In a remote workspace, the files are first copied into `path` (see `fetch`)."""
        if self.remote:
            return self.fetch(verify)
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.manifest_path}: unreadable manifest ({e})") from e
        if verify:
            verify_files(self.path, manifest.get("files", []))
        return manifest

    def read_bytes(self, relative: str) -> bytes:
        """One file of the stage, read where the stage lives; nothing is copied to the cache."""
        if remote := self.remote:
            return remote.read_bytes(relative)
        return inside(self.path, relative).read_bytes()

    def stored_manifest(self) -> dict[str, Any]:
        """The committed manifest as stored, without verifying or fetching the files it lists
        (what a plan reads: for a remote stage, one small download)."""
        try:
            return json.loads(self.read_bytes(MANIFEST))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.location}/{MANIFEST}: unreadable manifest ({e})") from e

    def listed_sha256(self, relative: str) -> str:
        """The sha256 the committed manifest records for file `relative`."""
        for entry in self.stored_manifest().get("files", []):
            if entry["path"] == relative:
                return entry["sha256"]
        raise UserError(f"{self.location}/{MANIFEST}: lists no file {relative}")

    def fetch(self, verify: bool = True) -> dict[str, Any]:
        """Copy a committed remote stage into `path`; return its manifest.

        A cached file that matches the manifest's sha256 is kept; any other is downloaded
        and must match, or the remote file is refused by name. Without `verify`, a cache
        whose manifest equals the remote one is trusted as it is. A local stage is only
        read.
        """
        remote = self.remote
        if remote is None:
            return self.read_manifest(verify)
        text = remote.read_bytes(MANIFEST)
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{remote.uri}/{MANIFEST}: unreadable manifest ({e})") from e
        if not verify and self.manifest_path.is_file() and self.manifest_path.read_bytes() == text:
            return manifest
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in manifest.get("files", []):
            local = inside(self.path, entry["path"])
            if local.is_file() and sha256_file(local) == entry["sha256"]:
                continue
            with atomic_path(local) as tmp:
                remote.download(entry["path"], tmp)
                if sha256_file(tmp) != entry["sha256"]:
                    raise UserError(
                        f"{remote.uri}/{entry['path']}: contents do not match the sha256 in {remote.uri}/{MANIFEST} "
                        "(the file was modified or corrupted; delete the remote stage directory to rebuild it)"
                    )
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_bytes(text)
        return manifest

    def reset(self) -> None:
        """Remove a half-built directory (no manifest) before building it again. In a
        remote workspace only the local copy goes: remote files without a manifest are
        ignored, and the commit overwrites them."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest last: from this moment the stage's output exists. In a remote
        workspace, upload the files the manifest lists first, then the manifest."""
        write_json_atomic(self.manifest_path, manifest)
        if remote := self.remote:
            for entry in manifest.get("files", []):
                remote.upload(inside(self.path, entry["path"]), entry["path"])
            remote.upload(self.manifest_path, MANIFEST)

    def build_once(self, build: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The stage's verified manifest and whether it was reused.

        Under the lock: a committed directory is verified and reused; otherwise it is
        reset, `build(self.path)` writes the files and returns the manifest, which is
        committed last. If `build` raises, the directory stays uncommitted.
        """
        with self.lock():
            if self.is_complete():
                return self.read_manifest(verify=True), True
            self.reset()
            manifest = build(self.path)
            self.commit(manifest)
            return manifest, False


class StageOutput(BaseModel):
    """What a stage returns to the next ones: small records and paths, never data."""

    path: Path  # the stage directory
    fingerprint: str
    report: dict[str, Any]  # the figures of the stage's manifest
    reused: bool = False  # a verified earlier run was found and nothing was redone

    @classmethod
    def build_once(cls, stage: StageDir, build: Callable[[Path], dict[str, Any]], **files: str) -> Self:
        """Build `stage` (or reuse it, see `StageDir.build_once`) and describe it; `files`
        maps the output's path fields to file names in the stage directory. The manifest
        must carry the stage's `report`."""
        manifest, reused = stage.build_once(build)
        paths = {field: stage.path / name for field, name in files.items()}
        return cls(path=stage.path, fingerprint=stage.fingerprint, report=manifest["report"], reused=reused, **paths)

    def local_file(self, file: Path, workspace: Path | str) -> Path:
        """`file` of this output on this machine: where it is, or, on a machine that lacks
        it (a worker elsewhere), copied from the remote workspace into the local cache."""
        if file.is_file() or not is_remote(workspace):
            return file
        stage = StageDir(workspace, self.path.parent.name, self.fingerprint)
        with stage.lock():
            stage.fetch(verify=False)
        return stage.path / file.relative_to(self.path)
