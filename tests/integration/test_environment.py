"""Importing `flows` changes nothing; the entry points apply gptflow's environment defaults.

Each check runs in a fresh interpreter whose environment lacks the defaults (this session's
conftest has applied them to its own) and has a live `gptflow up` server in its state file,
so an import that applied the defaults, or looked the server up, would show.

A Prefect server `gptflow up` recorded is where runs go until `gptflow down`, even when its
process is gone: a run then stops with one line naming it, unless PREFECT_API_URL says otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from ops.environment import DEFAULTS
from ops.server_state import PREFECT, ServerRecord, write_records
from support import REPO
from support.configs import write_pipeline_config
from support.ports import free_port
from support.processes import GPTFLOW

API_URL = "http://127.0.0.1:4999/api"

# Imports every module of `cli`, `flows` and `ops` but the worker's entry point, then loads that entry point as
# a Prefect worker does (by its path); prints what each step changed in the environment.
CHECK = """
import importlib, json, os, pkgutil

def changes(old):
    return {k: os.environ.get(k) for k in old.keys() | os.environ.keys() if old.get(k) != os.environ.get(k)}

before = dict(os.environ)
import cli, flows, ops
for package in (cli, flows, ops):
    for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
        if module.name != "flows.deployment":
            importlib.import_module(module.name)
by_imports, before = changes(before), dict(os.environ)

from prefect.flows import load_flow_from_entrypoint

loaded = load_flow_from_entrypoint("flows/deployment.py:pipeline")
print(json.dumps({"by_imports": by_imports, "by_entry_point": changes(before), "flow": loaded.name}))
"""


def test_importing_flows_leaves_the_environment_alone_and_the_worker_entry_point_applies_the_defaults(
    tmp_path, monkeypatch
):
    # A live Prefect server that the lookup would find: this test's own process stands in for it.
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    write_records({PREFECT: ServerRecord(pid=os.getpid(), api_url=API_URL, ui_url="", log_file="")})
    env = {key: value for key, value in os.environ.items() if key not in (*DEFAULTS, "PREFECT_API_URL")}

    completed = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.splitlines()[-1])
    assert report["by_imports"] == {}
    assert report["by_entry_point"] == {**DEFAULTS, "PREFECT_API_URL": API_URL}
    assert report["flow"] == "pipeline"


def prepare_with_a_dead_prefect_record(tmp_path, monkeypatch, **env) -> tuple[subprocess.CompletedProcess, str, str]:
    """`gptflow prepare` while the state file records a Prefect server whose process is gone
    and whose port nobody listens on; returns the run, the recorded API address, the config's name."""
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "gptflow-home"))
    gone = subprocess.Popen(["true"])
    gone.wait()
    api_url = f"http://127.0.0.1:{free_port()}/api"
    write_records({PREFECT: ServerRecord(pid=gone.pid, api_url=api_url, ui_url="", log_file="")})
    name = f"recorded-{uuid.uuid4().hex[:8]}"
    config = write_pipeline_config(tmp_path, name=name)
    completed = subprocess.run(
        [GPTFLOW, "prepare", str(config), "--set", "tracking_attempts=2"],
        env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return completed, api_url, name


def test_a_run_stops_with_one_line_naming_the_recorded_prefect_server_when_it_is_gone(tmp_path, monkeypatch):
    completed, api_url, _ = prepare_with_a_dead_prefect_record(tmp_path, monkeypatch)

    output = completed.stdout + completed.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert completed.returncode == 2, output[-3000:]
    assert errors == [
        f"error: the Prefect server that `gptflow up` started, {api_url}, is unreachable after 2 attempts; "
        "start it again with `gptflow up` (or forget it with `gptflow down`), or set PREFECT_API_URL"
    ]
    assert "Traceback" not in output
    assert not (tmp_path / "workspace").exists()  # nothing ran, on no other server


def test_prefect_api_url_in_the_environment_wins_over_the_recorded_server(tmp_path, monkeypatch, prefect_server):
    completed, _, name = prepare_with_a_dead_prefect_record(tmp_path, monkeypatch, PREFECT_API_URL=prefect_server)

    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-3000:]
    with get_client(sync_client=True) as client:  # the session's server: the one the environment named
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=name)))
    assert [run.state_type.value for run in runs] == ["COMPLETED"]
