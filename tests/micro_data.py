"""A micro corpus for the data-preparation tests: a few standard-library modules."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

from flows.prepare import PreparedData

STDLIB_FILES = ["abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "shlex.py", "textwrap.py"]


def micro_config(root: Path) -> Path:
    """A config file for the micro corpus (vocab 300, seq_len 32, several shard files)."""
    (root / "src").mkdir(parents=True)
    for name in STDLIB_FILES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, root / "src" / name)
    config = root / "micro.yaml"
    config.write_text(
        "name: micro\n"
        f"workspace: {root / 'workspace'}\n"
        f"ingest: {{source: {root / 'src'}, val_fraction: 0.3, seed: 0}}\n"
        "bpe: {vocab_size: 300, min_frequency: 2}\n"
        "shard: {seq_len: 32, shard_bytes: 16384}\n"
    )
    return config


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def stage_digests(prepared: PreparedData) -> dict[str, dict[str, str]]:
    return {stage: file_digests(output.path) for stage, output in prepared.stages().items()}
