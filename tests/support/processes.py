"""Code run in fresh interpreters from the repository: a Python snippet, an ingest that reports
its peak memory, and a training run under torchrun that reports its step metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model.train import RunSpec
from support import REPO

GPTFLOW = str(Path(sys.executable).with_name("gptflow"))  # the command line, as users run it

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


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter in the repository; returns stdout, fails on an error exit."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


RECORD_METRICS = """
import json, os, sys
from pathlib import Path
from model.train import RunSpec, run

metrics = {}
run(RunSpec.model_validate_json(Path(sys.argv[1]).read_text()), lambda step, m: metrics.update({step: dict(m)}))
if os.environ.get("RANK", "0") == "0":
    print(json.dumps(metrics))
"""


def write_spec(directory: Path, name: str, spec: RunSpec) -> Path:
    path = directory / f"{name}.json"
    path.write_text(spec.model_dump_json())
    return path


def torchrun(spec: Path, nproc: int, *rendezvous: str, timeout: float = 300) -> dict[str, dict[str, float]]:
    """Train `spec` under torchrun (`--standalone` unless a rendezvous is given); rank 0's step metrics by step."""
    script = spec.with_name("record_metrics.py")
    script.write_text(RECORD_METRICS)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(rendezvous or ["--standalone"]),
        f"--nproc_per_node={nproc}",
        str(script),
        str(spec),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
