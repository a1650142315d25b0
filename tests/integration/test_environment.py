"""Importing `flows` changes nothing; the entry points apply gptflow's environment defaults.

Each check runs in a fresh interpreter whose environment lacks the defaults (this session's
conftest has applied them to its own) and has a live `gptflow up` server in its state file,
so an import that applied the defaults, or looked the server up, would show.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ops.environment import DEFAULTS
from ops.server_state import PREFECT, ServerRecord, write_records
from support import REPO

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
