"""A run killed with SIGKILL on the embedded Prefect server (no server configured) leaves
neither its server process nor its `gpu` slot behind: a rerun with the same PREFECT_HOME
proceeds (flows/leases.py, flows/embedded_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline_micro import write_config

GPTFLOW = str(Path(sys.executable).parent / "gptflow")


def embedded_servers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_rerun_after_sigkill_on_the_embedded_server_proceeds_and_no_server_is_orphaned(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("PREFECT_API_URL", None)  # the embedded default, as a new user has it
    config = write_config(tmp_path, name="leases")
    endless = ["--set=pretrain.max_steps=100000", "--set=pretrain.checkpoint_every=5", "--set=finetune=null"]
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([GPTFLOW, "pretrain", str(config), *endless], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "workspace").glob("pretrain/*/checkpoints/step-*")):
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    servers = embedded_servers(killed.pid)
    assert servers, "the run should talk to an embedded server"
    killed.kill()  # SIGKILL while holding the `gpu` slot: no exit handler runs
    killed.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "the killed run's embedded server outlived it"

    # Another config (the killed one would train for ever): it needs the same `gpu` slot.
    rerun = subprocess.run([GPTFLOW, "pretrain", str(config), "--set=pretrain.max_steps=10", "--set=finetune=null"],
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert "reclaimed 1 expired concurrency lease" in output
    # Killed seconds after taking the slot, its lease still runs when the rerun asks: it says so.
    (waiting,) = [line for line in output.splitlines() if "waiting for 1 slot(s) of concurrency limit 'gpu'" in line]
    assert "(1 of 1 slots taken), held by flow run 'leases-" in waiting and " since " in waiting
