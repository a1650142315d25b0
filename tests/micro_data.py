"""The data-preparation tests' micro corpus (a few standard-library modules) and helpers."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

from flows.prepare import PreparedData

# A script that ingests (config JSON, workspace) and prints its peak memory (RSS).
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak.
PEAK_RSS_OF_INGEST = """
import sys
from pathlib import Path
from tasks.ingest import IngestConfig, run_ingest
run_ingest(IngestConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]))
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""

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
