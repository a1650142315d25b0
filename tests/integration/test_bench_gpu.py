"""bench/gpu.py's smoke mode on the CPU: every phase runs at micro shapes, appends its JSON line,
and a phase out of time is recorded as such without stopping the others. It runs as on the lent
GPU machine: prefect, mlflow, datasketch, datasets and dask hidden (tests/support/hidden_packages),
so an import that reaches for one of them fails here rather than on the GPU."""

import json
import os
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow  # one child process per phase

HIDDEN_PACKAGES = REPO / "tests" / "support" / "hidden_packages"  # its sitecustomize.py hides them


def run_bench(out, *args):
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--smoke", "--out", str(out), *args]
    env = {**os.environ, "PYTHONPATH": str(HIDDEN_PACKAGES)}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env, check=True).stdout


def test_the_packages_are_hidden_in_the_benchs_processes():
    probe = "import sys\ntry:\n    import prefect\nexcept ModuleNotFoundError:\n    sys.exit(0)\nsys.exit(1)"
    env = {**os.environ, "PYTHONPATH": str(HIDDEN_PACKAGES)}
    assert subprocess.run([sys.executable, "-c", probe], env=env, check=False).returncode == 0
    assert subprocess.run([sys.executable, "-c", probe], check=False).returncode == 1  # installed here


def test_help_gives_the_prepared_command_for_the_lent_machine():
    env = {**os.environ, "PYTHONPATH": str(HIDDEN_PACKAGES)}
    command = [sys.executable, str(REPO / "bench" / "gpu.py"), "--help"]
    printed = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    assert "bash bench/gpu_machine.sh run" in printed and 'carry ["bench/wheels"]' in printed


def test_smoke_mode_runs_every_kind_of_phase_without_the_pipelines_packages(tmp_path):
    out = tmp_path / "bench.jsonl"
    # no_padding / no_chunked_loss / no_compile are train_small with one field changed
    phases = ["env", "train", "train_small", "plain", "sparse", "generate", "loader", "evaluate"]
    printed = run_bench(out, "--phases", *phases, "--budget-scale", "20")
    assert printed.startswith("device cpu (CPU), torch ")
    records = {record["phase"]: record for record in map(json.loads, out.read_text().splitlines())}
    assert list(records) == phases
    assert all(record["ok"] for record in records.values()), records
    assert records["train"]["tokens_per_s"] > 0 and records["train"]["checkpoint_s"] >= 0
    assert records["train"]["shape"] == "4 x 128 x 2 micro-batches = 1024 tokens a step"
    assert records["train"]["mfu"] > 0 and records["train"]["mfu_llmc"] > 0
    assert records["train"]["host_syncs_per_step"] == 0  # counted on CUDA only
    assert records["sparse"]["graph_breaks"] == 0 and records["sparse"]["flex_vs_sdpa_max_abs_diff"] < 1e-4
    assert records["sparse"]["dense_tokens_per_s"] > 0
    assert records["generate"]["cached_vs_uncached_logits_max_abs_diff"] < 1e-4
    assert "FAIL" not in printed and "PASS  cached logits = uncached" in printed
    assert "n/a   gpt2-small MFU >= 40% of the bf16 peak" in printed  # no speed verdicts at micro shapes


def test_a_phase_out_of_time_is_recorded_and_the_next_runs(tmp_path):
    out = tmp_path / "bench.jsonl"
    printed = run_bench(out, "--phases", "train", "loader", "--budget-scale", "0.001")  # 0.12 s and 0.015 s
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["phase"] for record in records] == ["train", "loader"]
    assert all(not record["ok"] and record["error"].startswith("timed out") for record in records)
    assert "n/a   engine >= 1.0x the plain compiled bf16 step" in printed
