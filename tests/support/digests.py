"""File digests, to compare stage outputs byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flows.prepare import PreparedData


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def stage_digests(prepared: PreparedData) -> dict[str, dict[str, str]]:
    return {stage: file_digests(output.path) for stage, output in prepared.stages().items()}
