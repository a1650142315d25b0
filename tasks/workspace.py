"""Stage directories, fingerprints and manifests: the contract between stages.

Every stage writes into `<workspace>/<stage>/<fingerprint>/`. The fingerprint hashes what
changes the stage's result (its config, the fingerprints of its inputs, a format version),
so the same inputs always land in the same directory and a changed one gets a new
directory. `manifest.json` is written last and is the commit marker: a directory without
one is incomplete and is rebuilt; a directory with one is verified (sha256 of each file it
lists) and reused.
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
    """`<workspace>/<stage>/<fingerprint>/` and the operations on it."""

    workspace: Path
    stage: str
    fingerprint: str

    @property
    def path(self) -> Path:
        return self.workspace / self.stage / self.fingerprint

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def lock(self) -> FileLock:
        """An inter-process lock so two runs never build the same stage at once."""
        lock_path = self.workspace / self.stage / f"{self.fingerprint}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(lock_path))

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self, verify: bool = True) -> dict[str, Any]:
        """The committed manifest; with `verify`, every listed file must match its sha256."""
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.manifest_path}: unreadable manifest ({e})") from e
        if verify:
            verify_files(self.path, manifest.get("files", []))
        return manifest

    def reset(self) -> None:
        """Remove a half-built directory (no manifest) before building it again."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest last: from this moment the stage's output exists."""
        write_json_atomic(self.manifest_path, manifest)

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
