"""bench/scale.py at a smoke size: it builds its corpus offline, runs the three data stages twice
(full and quarter), and prints every row of its table and its targets. Its figures at this size mean nothing."""

import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow  # six stage processes and six more for the reruns: minutes


def test_the_scale_benchmark_prints_its_table_at_a_smoke_size():
    command = [sys.executable, str(REPO / "bench" / "scale.py"), "--megabytes", "2", "--vocab-size", "600"]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, check=True).stdout
    lines = printed.splitlines()
    for stage in ("ingest", "bpe", "shard"):
        assert sum(line.split()[:1] == [stage] and "MiB peak" in line for line in lines) == 2  # full and quarter
        assert any(line.split()[:1] == [stage] and "peak RSS" in line for line in lines)  # the growth ratio
    for limit in ("read+sha256", "bpe trainer", "encode_batch", "parquet write"):
        assert sum(line.split()[:2] == limit.split()[:2] or line.split()[:1] == [limit] for line in lines) == 2
    assert sum("rerun" in line and "reused" in line for line in lines) == 2
    assert sum("val bytes/token: sample" in line and "whole split" in line for line in lines) == 2
    targets = lines[lines.index("targets at full size (issue 25):") + 1 :][:6]
    assert [line.split()[0] for line in targets] == ["ingest", "bpe", "shard", "ingest", "bpe", "shard"]
    assert all(line.endswith("met") for line in targets)  # "met" or "NOT met"
    assert [line.split()[:2] for line in lines if "dropped:" in line] == [
        ["code", "code"],
        ["code", "web"],
        ["prose", "code"],
        ["prose", "web"],
    ]
