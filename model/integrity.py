"""File integrity: sha256 digests and checking files against the digests a manifest lists.

Lives in `model/` because the shard loader verifies its files when it opens them and
`model/` imports nothing from `tasks/`; the stages use it through `tasks.core.workspace`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from model.errors import UserError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def inside(directory: Path, relative: str) -> Path:
    """`directory / relative`, refusing paths that would leave `directory`.

    Manifests name their files by relative path; a manifest written by someone else must
    not be able to point a stage at `../../etc/passwd` or an absolute path.
    """
    candidate = Path(relative)
    resolved = (directory / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(directory.resolve()):
        raise UserError(f"{directory / MANIFEST}: file path {relative!r} leaves the stage directory")
    return resolved


def verify_files(directory: Path, files: list[dict[str, Any]]) -> None:
    """Check each `{"path", "sha256"}` entry; name the first file that does not match."""
    for entry in files:
        path = inside(directory, entry["path"])
        if not path.is_file():
            raise UserError(f"{path}: listed in {directory / MANIFEST} but missing")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(
                f"{path}: contents no longer match the sha256 in {directory / MANIFEST} "
                "(the file was modified or corrupted; delete the stage directory to rebuild it)"
            )
