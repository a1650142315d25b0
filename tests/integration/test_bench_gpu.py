"""bench/gpu.py's smoke mode on the CPU: every phase runs at micro shapes, appends its JSON line,
and a phase out of time is recorded as such without stopping the others."""

import json
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow  # one child process per phase


def run_bench(out, *args):
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--smoke", "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, check=True).stdout


def test_smoke_mode_runs_every_kind_of_phase(tmp_path):
    out = tmp_path / "bench.jsonl"
    # no_padding / no_chunked_loss / no_compile are the train phase with one field changed
    printed = run_bench(
        out, "--phases", "env", "train", "plain", "sparse", "generate", "loader", "evaluate", "--budget", "3000"
    )
    records = {record["phase"]: record for record in map(json.loads, out.read_text().splitlines())}
    assert list(records) == ["env", "train", "plain", "sparse", "generate", "loader", "evaluate"]
    assert all(record["ok"] for record in records.values()), records
    assert records["train"]["tokens_per_s"] > 0 and records["train"]["checkpoint_s"] >= 0
    assert records["sparse"]["graph_breaks"] == 0 and records["sparse"]["flex_vs_sdpa_max_abs_diff"] < 1e-4
    assert records["generate"]["cached_equals_uncached"] is True
    assert "FAIL" not in printed and "PASS  cached greedy tokens = uncached" in printed
    assert "n/a   gpt2-small MFU >= 40% of the bf16 peak" in printed  # no speed verdicts at micro shapes


def test_a_phase_out_of_time_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "bench.jsonl"
    printed = run_bench(out, "--phases", "train", "loader", "--budget", "1")  # 0.2 s and 0.03 s: too short to start
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["phase"] for record in records] == ["train", "loader"]
    assert all(not record["ok"] and record["error"].startswith("timed out") for record in records)
    assert "n/a   engine >= 1.0x the plain compiled bf16 step" in printed
