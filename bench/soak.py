"""Soak: scheduled runs of the micro pipeline on servers `gptflow up` started, with a killed rank, a
Prefect server restart and a tracking outage among them.

    .venv/bin/python bench/soak.py --runs 20      # figures in docs/reliability.md
    .venv/bin/python bench/soak.py --runs 3       # a quick check (tests/integration/test_servers.py runs
                                                  # its 2 faulted runs through `soak()`)

`gptflow serve --interval` serves the pipeline as a deployment; the server's scheduler creates its
runs and the serving process starts each when due. Pretraining runs under torchrun (two ranks), so
one run's training process can be SIGKILLed after a checkpoint: that run must complete after the
stage's retry, resuming from the checkpoint. During another run's training, while it holds the
`gpu` slot, the Prefect server is stopped and started again on its port, database and lease files:
the run must complete and its slot come free for the next run. During a third run's training the
MLflow server is SIGKILLed and started again a few seconds later: MLflow's client retries must
carry the run through. At the end: every run COMPLETED, no MLflow run left RUNNING, no `gpu` slot
taken, each registered version made by exactly one of the runs (and each run made one), and
nothing lost: each version's registered weights (downloaded from MLflow) hash as its run's final
checkpoint in the workspace. Prints per run its state, duration, retries and fault, then the
totals; exits 1 if a check fails.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import psutil
import typer
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the micro world and the server helpers of the tests

from flows.pipeline_config import load_config  # noqa: E402
from model.checkpoint import WEIGHTS, checkpoint_step, latest_checkpoint  # noqa: E402
from support.configs import write_pipeline_config  # noqa: E402
from support.servers import (  # noqa: E402
    BIN,
    MlflowServer,
    Servers,
    deployment,
    flow_runs,
    get,
    mlflow_runs,
    patch,
    post,
    prefect_server_of_gptflow_up,
    started_servers,
    stop,
    tags,
    wait_for,
)
from support.sigint import with_sigint  # noqa: E402
from tasks.core.workspace import sha256_file  # noqa: E402

DEPLOYMENT = "soak"
MAX_STEPS = 200  # each run's pretraining; with its seed, what tells its stage in the workspace
# Every run the same: two ranks under torchrun (a training process to kill), steps enough to
# kill it between checkpoints, a retry after 1 s rather than the default 30 s.
SOAK_OVERRIDES = [
    "pretrain.nproc_per_node=2",
    "pretrain.micro_batch_size=4",  # the micro config's 256-token batch over two ranks
    f"pretrain.max_steps={MAX_STEPS}",
    "pretrain.checkpoint_every=20",
    "pretrain.retry_delay_seconds=1",
    "finetune=null",
]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# Down this long, then starting again (about 20 s more): inside MLflow's client retries (7 with
# backoff: minutes) for the runs in flight, and mostly inside the 30 s a run starting meanwhile
# waits for the server (`check_tracking_server`).
OUTAGE_SECONDS = 2.0
KILLED_RANK, PREFECT_RESTART, TRACKING_OUTAGE = "killed rank", "prefect restart", "tracking outage"
# The Prefect server reports each lease its repossessor reclaims (a holder that stopped renewing)
# with this line, at INFO: the soak's servers log at INFO (`main`).
RECLAIMED_LEASE_LINE = "Revoking lease "


@dataclass
class SoakRun:
    index: int  # 1-based, in scheduled order; also the run's pretraining seed
    flow_run_id: str
    fault: str = ""  # KILLED_RANK, PREFECT_RESTART or TRACKING_OUTAGE
    fault_after_step: int | None = None  # the newest checkpoint when the fault struck
    state: str = "SCHEDULED"
    seconds: float = 0.0
    retries: int = 0  # task runs beyond each task's first
    resumed_at_step: int | None = None  # the first step the retried pretraining attempt logged
    version: str | None = None  # the registered version this run made
    gpu_slots_across_restart: tuple[int, int] | None = None  # `gpu` slots taken before and after the restart


@dataclass
class WeightsCheck:
    """Nothing lost: a registered version's weights against its run's final checkpoint."""

    version: str
    run_index: int
    registered_sha256: str  # model.safetensors downloaded from the version's artifacts
    checkpoint_sha256: str | None  # model.safetensors of the run's final checkpoint in the workspace; None: not found

    def matches(self) -> bool:
        return self.registered_sha256 == self.checkpoint_sha256


@dataclass
class SoakReport:
    runs: list[SoakRun]
    wall_seconds: float
    running_mlflow_runs: list[str]  # names of MLflow runs still RUNNING at the end
    versions_by_flow_run: dict[str, list[str]] = field(default_factory=dict)  # flow run id -> versions it made
    stray_versions: list[str] = field(default_factory=list)  # versions none of the soak's runs made
    weights: list[WeightsCheck] = field(default_factory=list)  # one per version the soak's runs made
    gpu_slots_left: int = 0  # `gpu` slots still taken once every run ended
    leases_reclaimed: int | None = None  # by the Prefect server's repossessor; None: its log does not say

    def failures(self) -> list[str]:
        """What went wrong, one line each; empty when the soak passed."""
        found = [f"run {run.index}: {run.state}" for run in self.runs if run.state != "COMPLETED"]
        for run in self.runs:
            if run.fault and run.fault_after_step is None:
                found.append(f"run {run.index}: the {run.fault} never struck (no checkpoint seen while it trained)")
            elif run.fault == KILLED_RANK and not (run.retries >= 1 and resumed_from_checkpoint(run)):
                found.append(
                    f"run {run.index}: killed after step {run.fault_after_step}, resumed at {run.resumed_at_step}"
                )
            elif run.fault == PREFECT_RESTART and run.gpu_slots_across_restart != (1, 1):
                slots = run.gpu_slots_across_restart
                found.append(f"run {run.index}: `gpu` slots taken before and after the Prefect restart: {slots}")
            if len(made := self.versions_by_flow_run.get(run.flow_run_id, [])) != 1:
                found.append(f"run {run.index}: registered versions {made}, not exactly one")
        found += [f"MLflow run left RUNNING: {name}" for name in self.running_mlflow_runs]
        found += [f"version {version} made by none of the soak's runs" for version in self.stray_versions]
        found += [
            f"version {check.version} (run {check.run_index}): registered weights {check.registered_sha256[:12]}, "
            f"final checkpoint {(check.checkpoint_sha256 or 'not found')[:12]}"
            for check in self.weights
            if not check.matches()
        ]
        if self.gpu_slots_left:
            found.append(f"{self.gpu_slots_left} `gpu` slot(s) still taken after the last run")
        return found


def resumed_from_checkpoint(run: SoakRun) -> bool:
    """The retry went on from the checkpoint seen when the rank was killed (or a newer one), not from step 1."""
    return run.resumed_at_step is not None and run.resumed_at_step > run.fault_after_step


def soak(
    servers: Servers,
    config: Path,
    runs: int,
    interval: int,
    kill_run: int,
    outage_run: int,
    console: Console,
    restart_run: int | None = None,
) -> SoakReport:
    """Serve `config` every `interval` s on `servers`; fault runs `kill_run`, `outage_run` and
    `restart_run` (none: no Prefect restart); gather the outcome."""
    started, settings = time.monotonic(), load_config(config)
    with open(servers.root / "soak-serve.log", "ab") as log:
        serving = subprocess.Popen(  # `stop` sends it SIGINT
            with_sigint(
                [str(BIN / "gptflow"), "serve", str(config), "--interval", str(interval), "--name", DEPLOYMENT]
                + [f"--set={override}" for override in SOAK_OVERRIDES]
            ),
            cwd=servers.root,
            env={**servers.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        served = wait_for(lambda: deployment(servers, f"pipeline/{DEPLOYMENT}"), 180, "the served deployment")
        soak_runs = scheduled_runs(servers, served, runs)
        faults = {kill_run: KILLED_RANK, outage_run: TRACKING_OUTAGE, restart_run: PREFECT_RESTART}
        for run in soak_runs:
            run.fault = faults.get(run.index, "")
        watch(servers, served, soak_runs, servers.root / str(settings.workspace), console)  # as the runs resolve it
    finally:
        stop(serving)
    workspace = servers.root / str(settings.workspace)
    return gather(servers, settings.name, soak_runs, workspace, time.monotonic() - started)


def scheduled_runs(servers: Servers, served: dict, runs: int) -> list[SoakRun]:
    """The deployment's first `runs` scheduled runs, each given its own pretraining seed.

    Identical runs would reuse every stage after the first (the manifest cache) and register
    nothing new; a seed of their own makes each train and register a version. The runs are
    the scheduler's: the soak asks the server to schedule them now (what its scheduler loop
    does each minute) and only sets each run's parameters before it is due."""
    post(f"{servers.prefect}/api/deployments/{served['id']}/schedule", {"min_runs": runs, "max_runs": runs})
    found = flow_runs(
        servers,
        {
            "deployments": {"id": {"any_": [served["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
            "limit": runs,
        },
    )
    assert len(found) == runs, f"the scheduler made {len(found)} runs, not {runs}"
    for index, flow_run in enumerate(found, start=1):
        parameters = {**flow_run["parameters"]}
        parameters["overrides"] = [*parameters["overrides"], f"pretrain.seed={index}"]
        patch(f"{servers.prefect}/api/flow_runs/{flow_run['id']}", {"parameters": parameters})
    return [SoakRun(index, flow_run["id"]) for index, flow_run in enumerate(found, start=1)]


def watch(servers: Servers, served: dict, runs: list[SoakRun], workspace: Path, console: Console) -> None:
    """Until every run has ended: strike each run's fault once it has a checkpoint; delete the
    runs the server's scheduler keeps adding beyond the soak's while they wait, and pause the
    schedule once the last run has started, so no run beyond the soak's starts."""
    paused, outages = False, []
    pending = {run.flow_run_id: run for run in runs}
    while pending:
        time.sleep(0.5)
        try:
            delete_runs_beyond_the_soak(servers, served, runs)
            states = {
                flow_run["id"]: flow_run["state_type"]
                for flow_run in flow_runs(servers, {"flow_runs": {"id": {"any_": list(pending)}}})
            }
        except urllib.error.HTTPError as e:
            if e.code != 503:  # 503: the server is busy (its database locked under load); ask again
                raise
            continue
        if not paused and states.get(runs[-1].flow_run_id) != "SCHEDULED":
            post(f"{servers.prefect}/api/deployments/{served['id']}/pause_deployment", {})
            paused = True
        for flow_run_id, state in states.items():
            run = pending[flow_run_id]
            if run.fault and run.fault_after_step is None and state == "RUNNING":
                outages += strike(servers, run, workspace)
            if state in TERMINAL:
                run.state = state
                del pending[flow_run_id]
                console.print(f"run {run.index:>2} {state} {run.fault}")
    for outage in outages:
        outage.join()


def delete_runs_beyond_the_soak(servers: Servers, served: dict, runs: list[SoakRun]) -> None:
    """Delete the deployment's scheduled runs, other than the soak's, due within a minute."""
    soon = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    beyond_the_soak = {
        "deployment_id": {"any_": [served["id"]]},
        "id": {"not_any_": [run.flow_run_id for run in runs]},
        "state": {"type": {"any_": ["SCHEDULED"]}},
        "expected_start_time": {"before_": soon},
    }
    post(f"{servers.prefect}/api/flow_runs/bulk_delete", {"flow_runs": beyond_the_soak})


def strike(servers: Servers, run: SoakRun, workspace: Path) -> list[threading.Thread]:
    """`run`'s fault, once its pretraining ranks run and have written a checkpoint. The
    outage goes on in a thread (the runs are watched meanwhile), returned to be joined; the
    Prefect restart is done when this returns (nothing can be watched while the server is away)."""
    ranks = pretraining_ranks(workspace, seed=run.index)
    if not ranks:
        return []
    checkpoint = latest_checkpoint(spec_of(ranks[0].info["cmdline"]).parent / "checkpoints")
    if checkpoint is None:
        return []
    run.fault_after_step = checkpoint_step(checkpoint)
    if run.fault == KILLED_RANK:
        with suppress(psutil.NoSuchProcess):  # it just finished: the missing retry fails the soak
            ranks[-1].kill()  # SIGKILL, as the OOM killer or a lost machine would
        return []
    if run.fault == PREFECT_RESTART:
        # The run trains, so it holds the `gpu` slot under a lease; the restarted server must
        # still know that lease (in files under PREFECT_HOME), or the slot stays taken for ever.
        taken_before = gpu_slots_taken(servers)
        prefect = prefect_server_of_gptflow_up(servers)
        prefect.stop()
        prefect.start()
        run.gpu_slots_across_restart = (taken_before, gpu_slots_taken(servers))
        return []
    server = MlflowServer.of_gptflow_up(servers)
    server.kill()
    outage = threading.Thread(target=lambda: (time.sleep(OUTAGE_SECONDS), server.start()))
    outage.start()
    return [outage]


def pretraining_ranks(workspace: Path, seed: int) -> list[psutil.Process]:
    """The torchrun ranks (`... -m tasks.pretrain_worker SPEC --result ...`, not the torchrun
    launcher that starts them) training with `seed` in `workspace` (other runs on the machine are not the soak's)."""
    ranks = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "tasks.pretrain_worker" in command and "torch.distributed.run" not in command:
            spec = spec_of(command)
            if (
                spec.is_relative_to(workspace)
                and spec.is_file()
                and json.loads(spec.read_text())["train"]["seed"] == seed
            ):
                ranks.append(process)
    return ranks


def spec_of(command: list[str]) -> Path:
    """A rank's RunSpec file: the stage's spec.json, next to its checkpoints."""
    return Path(command[command.index("tasks.pretrain_worker") + 1])


def gpu_slots_taken(servers: Servers) -> int:
    return get(f"{servers.prefect}/api/v2/concurrency_limits/gpu")["active_slots"]


def gather(servers: Servers, name: str, runs: list[SoakRun], workspace: Path, wall_seconds: float) -> SoakReport:
    """Each run's outcome from the Prefect and MLflow APIs, the versions of registered model
    `name`, and each version's weights against its run's final checkpoint in `workspace`."""
    for run in runs:
        flow_run = get(f"{servers.prefect}/api/flow_runs/{run.flow_run_id}")
        run.state, run.seconds = flow_run["state_type"], flow_run["total_run_time"]
        task_runs = post(f"{servers.prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [run.flow_run_id]}}})
        run.retries = sum(max(0, task_run["run_count"] - 1) for task_run in task_runs)
        if run.retries:
            run.resumed_at_step = resumed_at_step(servers, name, run.flow_run_id)
    running = [r["info"]["run_name"] for r in mlflow_runs(servers, "attributes.status = 'RUNNING'", name)]
    by_flow_run: dict[str, list[str]] = {}
    stray, weights = [], []
    index_of = {run.flow_run_id: run.index for run in runs}
    found = get(f"{servers.mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{name}%27&max_results=1000")
    for version in found.get("model_versions", []):
        register_run = get(f"{servers.mlflow}/api/2.0/mlflow/runs/get?run_id={version['run_id']}")["run"]
        parent = get(f"{servers.mlflow}/api/2.0/mlflow/runs/get?run_id={tags(register_run)['mlflow.parentRunId']}")
        flow_run_id = tags(parent["run"]).get("prefect.flow_run_id")
        if flow_run_id in index_of:
            by_flow_run.setdefault(flow_run_id, []).append(version["version"])
            seed = index_of[flow_run_id]
            weights.append(
                WeightsCheck(
                    version["version"],
                    seed,
                    registered_weights_sha256(servers, name, version["version"]),
                    final_checkpoint_sha256(workspace, seed),
                )
            )
        else:
            stray.append(version["version"])
    for run in runs:
        run.version = ",".join(by_flow_run.get(run.flow_run_id, [])) or None
    return SoakReport(
        runs, wall_seconds, running, by_flow_run, stray, weights, gpu_slots_taken(servers), leases_reclaimed(servers)
    )


def registered_weights_sha256(servers: Servers, name: str, version: str) -> str:
    """The sha256 of the weights file among version `version`'s artifacts, downloaded through MLflow.

    From the location the registry gives for the version: a `models:/NAME/VERSION` URI would be
    resolved through the default registry (a local mlflow.db), whatever registry_uri is given."""
    client = MlflowClient(tracking_uri=servers.mlflow, registry_uri=servers.mlflow)
    location = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory(prefix="soak-version-") as into:
        downloaded = download_artifacts(location, dst_path=into, tracking_uri=servers.mlflow)
        (weights,) = Path(downloaded).rglob(WEIGHTS)
        return sha256_file(weights)


def final_checkpoint_sha256(workspace: Path, seed: int) -> str | None:
    """The sha256 of the weights file of the final checkpoint (its manifest's `checkpoint`) of
    the completed pretraining stage in `workspace` that the soak's run with `seed` trained
    (finetune is off: its model is pretraining's); None if there is not exactly one."""
    found = []
    for manifest in workspace.glob("pretrain/*/manifest.json"):
        train = json.loads((manifest.parent / "spec.json").read_text())["train"]
        if (train["seed"], train["max_steps"]) == (seed, MAX_STEPS):
            found.append(manifest.parent / json.loads(manifest.read_text())["checkpoint"] / WEIGHTS)
    return sha256_file(found[0]) if len(found) == 1 else None


def leases_reclaimed(servers: Servers) -> int | None:
    """How many leases the Prefect server's repossessor reclaimed, as its log says (restarts
    append to the same log); None when the server logs below INFO and so does not say."""
    if servers.env.get("PREFECT_SERVER_LOGGING_LEVEL") != "INFO":
        return None
    return prefect_server_of_gptflow_up(servers).log.read_text(errors="replace").count(RECLAIMED_LEASE_LINE)


def resumed_at_step(servers: Servers, name: str, flow_run_id: str) -> int | None:
    """The first step the retried pretraining attempt of the flow run logged."""
    parent = mlflow_runs(servers, f"tags.`prefect.flow_run_id` = '{flow_run_id}'", name)[0]["info"]["run_id"]
    retried = mlflow_runs(
        servers,
        f"tags.mlflow.parentRunId = '{parent}' and attributes.run_name = 'pretrain' and tags.`gptflow.attempt` = '2'",
        name,
    )
    if not retried:
        return None
    history = get(
        f"{servers.mlflow}/api/2.0/mlflow/metrics/get-history?run_id={retried[0]['info']['run_id']}&metric_key=loss"
    )
    return min(metric["step"] for metric in history["metrics"])


def report_table(report: SoakReport) -> Table:
    table = Table(title=f"soak: {len(report.runs)} scheduled runs")
    for column in ("run", "state", "seconds", "retries", "fault", "resumed at step", "version"):
        table.add_column(column, justify="right" if column in ("run", "seconds", "retries") else "left")
    for run in report.runs:
        fault = f"{run.fault} after step {run.fault_after_step}" if run.fault else ""
        if run.gpu_slots_across_restart:
            fault += " (gpu slots taken {} → {})".format(*run.gpu_slots_across_restart)
        table.add_row(
            str(run.index),
            run.state,
            f"{run.seconds:.1f}",
            str(run.retries),
            fault,
            str(run.resumed_at_step or ""),
            run.version or "",
        )
    return table


def totals(report: SoakReport) -> str:
    seconds = [run.seconds for run in report.runs]
    completed = sum(run.state == "COMPLETED" for run in report.runs)
    retried = [run for run in report.runs if run.retries]
    resumed = sum((run.resumed_at_step or 1) > 1 for run in retried)  # the retry's first step after step 1
    reclaimed = (
        "leases reclaimed: not reported"
        if report.leases_reclaimed is None
        else f"{report.leases_reclaimed} leases reclaimed"
    )
    matching = sum(check.matches() for check in report.weights)
    return (
        f"{completed}/{len(report.runs)} COMPLETED, {len(retried)} retried "
        f"({sum(run.retries for run in report.runs)} retries), {resumed} resumed from a checkpoint, "
        f"{reclaimed}, {report.gpu_slots_left} gpu slots left taken, "
        f"run seconds median {statistics.median(seconds):.1f} max {max(seconds):.1f}, "
        f"{len(report.running_mlflow_runs)} MLflow runs left RUNNING, "
        f"{sum(map(len, report.versions_by_flow_run.values()))} versions for {len(report.runs)} runs "
        f"({len(report.stray_versions)} stray), {len(report.weights)} versions' weights checked, "
        f"{matching} matching their run's final checkpoint, wall {report.wall_seconds:.0f} s"
    )


def main(
    runs: Annotated[
        int,
        typer.Option(min=3, help="Scheduled runs: a killed one, one through a Prefect restart, one through an outage."),
    ] = 20,
    interval: Annotated[int, typer.Option(help="Seconds between scheduled runs.")] = 60,
    kill_run: Annotated[
        int | None, typer.Option(help="The run whose rank is killed.", show_default="runs // 4 + 1")
    ] = None,
    restart_run: Annotated[
        int | None, typer.Option(help="The run during which the Prefect server restarts.", show_default="runs // 2 + 1")
    ] = None,
    outage_run: Annotated[
        int | None, typer.Option(help="The run during which MLflow is down.", show_default="3 * runs // 4 + 1")
    ] = None,
) -> None:
    """Start servers with `gptflow up` in a temporary directory, soak them, print, stop them."""
    console = Console(width=120)  # the table whole in a log file, as docs/reliability.md quotes it
    # Spread over the runs, the restart before the outage (a run after each, to take the slot);
    # distinct for any count from 3.
    faulted = (kill_run or runs // 4 + 1, restart_run or runs // 2 + 1, outage_run or 3 * runs // 4 + 1)
    if len(set(faulted)) < 3 or not all(1 <= run <= runs for run in faulted):
        raise typer.BadParameter(f"faulted runs {faulted}: three different runs of 1..{runs}")
    kill_run, restart_run, outage_run = faulted
    # The Prefect server says at INFO which leases its repossessor reclaims (its log then has
    # uvicorn's access lines too: a few MB for 20 runs).
    os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the versions' downloads, not in the printout
    with tempfile.TemporaryDirectory(prefix="gptflow-soak-") as root:
        with started_servers(Path(root), "micro-soak", write_pipeline_config) as servers:
            report = soak(servers, servers.config, runs, interval, kill_run, outage_run, console, restart_run)
    console.print(report_table(report))
    console.print(totals(report), soft_wrap=True)  # one line, however long
    for failure in report.failures():
        console.print(f"FAIL {failure}")
    raise typer.Exit(1 if report.failures() else 0)


if __name__ == "__main__":
    typer.run(main)
