"""Faults injected into real processes: SIGKILL, dead servers, races.

Every kill here is a real SIGKILL to a real process (no cleanup code runs in it), at a
random moment drawn from a seeded generator (the seed is printed so a failure can be
replayed). Each test compares what the rerun leaves with what an uninterrupted run
leaves: byte for byte for the shards, bit for bit for the weights.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline_config import load_config
from flows.prepare import prepare_data_locally
from model.checkpoint import TOKENIZER, TOKENS, latest_checkpoint
from support import REPO
from support.configs import write_pipeline_config
from support.ports import free_port
from support.postgres import postgres_bin_dir
from support.processes import GPTFLOW
from support.servers import MlflowServer

SEED = 20261122
SHARD_TRIALS = 20
PRETRAIN_TRIALS = 5


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def temporary_files(root: Path) -> list[Path]:
    """What `atomic_path` and `save_checkpoint` write before renaming into place."""
    return [path for path in root.rglob("*") if ".tmp-" in path.name]


class Forker:
    """A Python process that has imported gptflow once and forks a fresh child per trial.

    Each child is a real process that is SIGKILLed; forking from a warm parent spares
    every trial the seconds that importing torch, pyarrow and prefect take. `code` defines
    `work(*args)`, which prints progress lines; the child prints `pid N` first.
    """

    PARENT = """
import json, os, sys
exec(sys.argv[1])
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        print(f"pid {os.getpid()}", flush=True)
        try:
            work(*json.loads(line))
        except BaseException as e:
            print(f"failed {e!r}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(f"exited {os.waitstatus_to_exitcode(status)}", flush=True)
"""

    def __init__(self, code: str):
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.PARENT, code],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def fork(self, *args: str) -> int:
        """Start `work(*args)` in a new child; returns its pid."""
        self.process.stdin.write(json.dumps(args) + "\n")
        self.process.stdin.flush()
        return int(self.read_until("pid ").split()[1])

    def read_until(self, prefix: str) -> str:
        """The first line of the child's (or parent's) output starting with `prefix`."""
        return self.lines_until(prefix)[-1]

    def lines_until(self, prefix: str) -> list[str]:
        """The output lines up to and including the first one starting with `prefix`; fails
        at once if the child ends or fails first (rather than wait on a parent that waits)."""
        seen = []
        for line in self.process.stdout:
            seen.append(line)
            if line.startswith(prefix):
                return seen
            assert not line.startswith(("failed", "exited ")), f"expected {prefix!r}:\n" + "".join(seen)[-3000:]
        raise AssertionError(f"the process exited before printing {prefix!r}:\n{''.join(seen)[-3000:]}")

    def wait(self) -> int:
        """The exit code of the child that ran last."""
        return int(self.read_until("exited ").split()[1])

    def kill(self, pid: int) -> int:
        """SIGKILL the child; returns its exit code (-9, or 0 if it had just finished)."""
        with suppress(ProcessLookupError):  # it finished, and the parent has reaped it
            os.kill(pid, signal.SIGKILL)
        return self.wait()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture
def forker_for():
    started: list[Forker] = []

    def make(code: str) -> Forker:
        started.append(Forker(code))
        return started[-1]

    yield make
    for forker in started:
        forker.close()


# --- SIGKILL during the shard stage ---------------------------------------------------------

SHARD_WORK = """
from flows.pipeline_config import load_config
from tasks.bpe import run_bpe
from tasks.ingest import run_ingest
from tasks.shard import run_shard

def work(config_path, workspace):
    config = load_config(config_path, [f"workspace={workspace}"])
    corpus = run_ingest(config.ingest, config.workspace)
    tokenizer = run_bpe(config.bpe, corpus, config.workspace)
    print("sharding", flush=True)
    run_shard(config.shard, corpus, tokenizer, config.workspace)
    print("done", flush=True)
"""


@pytest.fixture(scope="module")
def shard_config(tmp_path_factory) -> Path:
    """About 300 KB of standard-library source and 4 KiB shard files: over a hundred files,
    so random kills land while files are being written."""
    root = tmp_path_factory.mktemp("shard-faults")
    corpus, size = root / "corpus", 0
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size > 300_000:
            break
        shutil.copy(path, corpus / path.name)
        size += path.stat().st_size
    config = {
        "name": "shard-faults",
        "ingest": {"source": str(corpus), "val_fraction": 0.3},
        "bpe": {"vocab_size": 320},
        "shard": {"seq_len": 32, "shard_bytes": 4096},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sigkill_during_the_shard_stage_loses_nothing(shard_config, tmp_path, forker_for):
    rng, forker = random.Random(SEED), forker_for(SHARD_WORK)
    # The uninterrupted run, in a child like the killed ones, timed from the stage's start.
    reference = tmp_path / "reference"
    forker.fork(str(shard_config), str(reference))
    forker.read_until("sharding")
    started = time.monotonic()
    forker.read_until("done")
    shard_seconds = time.monotonic() - started
    assert forker.wait() == 0
    (expected_dir,) = [path for path in (reference / "shard").iterdir() if path.is_dir()]
    expected = digests(expected_dir)
    assert sum(name.endswith(".parquet") for name in expected) >= 50 and "manifest.json" in expected

    # Every trial starts from the committed ingest and bpe stages, so the kill hits sharding.
    base = tmp_path / "base"
    for stage in ("ingest", "bpe"):
        shutil.copytree(reference / stage, base / stage)
    interrupted = with_temporary_files = 0
    for trial in range(SHARD_TRIALS):
        workspace = tmp_path / f"trial-{trial}"
        shutil.copytree(base, workspace)
        child = forker.fork(str(shard_config), str(workspace))
        forker.read_until("sharding")
        time.sleep(rng.uniform(0, shard_seconds))
        forker.kill(child)
        stage_dir = workspace / "shard" / expected_dir.name
        interrupted += not (stage_dir / "manifest.json").exists()
        with_temporary_files += bool(temporary_files(workspace))

        prepared = prepare_data_locally(load_config(shard_config, [f"workspace={workspace}"]))

        assert prepared.shards.path == stage_dir
        assert digests(stage_dir) == expected, f"trial {trial} (seed {SEED})"
        assert not temporary_files(workspace), f"trial {trial} (seed {SEED})"
    # The kills must mostly land inside the stage, or the test proves little.
    assert interrupted >= SHARD_TRIALS * 0.6, (interrupted, shard_seconds)
    print(
        f"shard stage {shard_seconds:.2f} s, {len(expected) - 1} files; {SHARD_TRIALS} kills, "
        f"{interrupted} before the manifest, {with_temporary_files} with temporary files left"
    )


# --- SIGKILL during pretraining and during a checkpoint write ----------------------------------

PRETRAIN_OVERRIDES = [
    "pretrain.max_steps=12",
    "pretrain.checkpoint_every=3",
    "pretrain.keep_checkpoints=2",
    "pretrain.eval_every=0",
    "finetune=null",
]
PRETRAIN_WORK = f"""
import io, os, signal
import torch
from flows.pipeline_config import load_config
from flows.prepare import prepare_data_locally
from tasks.pretrain import run_pretrain

real_save = torch.save

def work(config_path, workspace, die_writing_step):
    config = load_config(config_path, [f"workspace={{workspace}}", *{PRETRAIN_OVERRIDES!r}])
    data = prepare_data_locally(config)
    if die_writing_step:
        def half_then_die(state, path):
            # The weights are written; the state file gets half its bytes, then the process dies.
            if state["step"] == int(die_writing_step):
                buffer = io.BytesIO()
                real_save(state, buffer)
                with open(path, "wb") as f:
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(state, path)
        torch.save = half_then_die
    output = run_pretrain(config.pretrain, config.model, data.shards, config.workspace,
                          callback=lambda step, metrics: step and print(f"step {{step}}", flush=True))
    print(f"done {{output.checkpoint}}", flush=True)
"""


def pretrain_run(forker: Forker, config: Path, workspace: Path) -> tuple[int | None, Path]:
    """Run (or resume) the pretrain stage in a child: (its first step, None if it had no
    step left to take; its final checkpoint)."""
    forker.fork(str(config), str(workspace), "")
    *output, done = forker.lines_until("done ")
    steps = [int(line.split()[1]) for line in output if line.startswith("step ")]
    assert forker.wait() == 0
    return (steps[0] if steps else None), Path(done.split(maxsplit=1)[1].strip())


@pytest.fixture(scope="module")
def pretrain_config(tmp_path_factory) -> Path:
    return write_pipeline_config(tmp_path_factory.mktemp("pretrain-faults"), name="pretrain-faults")


@pytest.mark.slow
def test_sigkill_during_pretraining_resumes_to_bitwise_identical_weights(pretrain_config, tmp_path, forker_for):
    rng, forker = random.Random(SEED), forker_for(PRETRAIN_WORK)
    reference = tmp_path / "reference"
    assert pretrain_run(forker, pretrain_config, reference)[0] == 1
    (stage_dir,) = (reference / "pretrain").glob("*/manifest.json")
    expected = stage_dir.parent / "checkpoints" / "step-12" / "model.safetensors"
    max_steps, every = 12, 3

    def trial(workspace: Path, kill) -> dict:
        """`kill()` starts a run in `workspace` and kills it (False if the run ended first);
        check what is left; rerun; compare weights."""
        shutil.copytree(
            reference, workspace, ignore=lambda directory, names: ["pretrain"] if directory == str(reference) else []
        )
        checkpoints = workspace / "pretrain" / stage_dir.parent.name / "checkpoints"
        if not kill():  # too late: the run finished on its own, there is nothing to resume
            return {}
        last = latest_checkpoint(checkpoints)
        half_written = list(checkpoints.glob(".step-*"))
        if last is not None:  # the newest complete checkpoint: all three files, the state loadable
            names = {path.name for path in last.iterdir()}
            assert {"model.safetensors", "config.json", "state.pt"} <= names
            # Killed after the last step, the final checkpoint may already hold (part of) its tokenizer.
            extra = names - {"model.safetensors", "config.json", "state.pt"}
            assert not extra or (last.name == f"step-{max_steps}" and extra <= {TOKENIZER, TOKENS})
            assert torch.load(last / "state.pt", weights_only=True)["step"] == int(last.name.removeprefix("step-"))

        first_step, final = pretrain_run(forker, pretrain_config, workspace)

        resumed_from = int(last.name.removeprefix("step-")) if last else 0
        assert first_step == (
            resumed_from + 1 if resumed_from < max_steps else None
        )  # the last checkpoint: no step left
        assert (final / "model.safetensors").read_bytes() == expected.read_bytes()
        assert not temporary_files(workspace)
        return {"resumed_from": resumed_from, "half_written": half_written}

    killed_at: list[int] = []
    for index in range(3 * PRETRAIN_TRIALS):  # a kill can come too late, after the run ended
        if len(killed_at) == PRETRAIN_TRIALS:
            break
        target = rng.randint(1, max_steps - 1)

        def kill_after_step() -> bool:
            workspace = tmp_path / f"trial-{index}"
            child = forker.fork(str(pretrain_config), str(workspace), "")
            forker.read_until(f"step {target}\n")
            time.sleep(rng.uniform(0, 0.05))
            committed = workspace / "pretrain" / stage_dir.parent.name / "manifest.json"  # killed after the commit
            killed = forker.kill(child) == -signal.SIGKILL and not committed.exists()
            if killed:
                killed_at.append(target)
            return killed

        trial(tmp_path / f"trial-{index}", kill_after_step)
    assert len(killed_at) == PRETRAIN_TRIALS

    # Dying while writing a checkpoint: the weights are on disk, the state file is half
    # written, and the directory was never renamed into place.
    dying_step = 2 * every

    def kill_while_checkpointing() -> bool:
        forker.fork(str(pretrain_config), str(tmp_path / "dying"), str(dying_step))
        assert forker.wait() == -signal.SIGKILL
        return True

    outcome = trial(tmp_path / "dying", kill_while_checkpointing)
    assert outcome["resumed_from"] == dying_step - every
    (half,) = outcome["half_written"]
    assert half.name.startswith(f".step-{dying_step}.tmp-")
    print(f"pretraining killed after steps {killed_at} and while writing step {dying_step}")


# --- the MLflow server: unreachable at start, dying during training ---------------------------


def gptflow_run(config: Path, env: dict, *overrides: str, wait: bool = True):
    command = [GPTFLOW, "run", str(config), *(f"--set={override}" for override in overrides)]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_an_unreachable_tracking_server_stops_the_pipeline_before_any_stage(cli_env, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_pipeline_config(tmp_path, name="unreachable")
    started = time.monotonic()
    result = gptflow_run(config, {**cli_env, "MLFLOW_TRACKING_URI": uri}, "tracking_attempts=2")
    seconds = time.monotonic() - started

    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and f"MLflow tracking server {uri} is unreachable after 2 attempts" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "workspace").exists()  # no stage ran
    assert seconds < 60  # a bounded retry (2 s here; 30 s by default), not MLflow's minutes of backoff


def checkpoints_in(workspace: Path) -> set[Path]:
    return set(workspace.glob("pretrain/*/checkpoints/step-*"))


def wait_for_a_checkpoint(running: subprocess.Popen, workspace: Path, seen: set[Path] = frozenset()) -> None:
    """Until pretraining in `workspace` has written a checkpoint not in `seen`: training is under way."""
    deadline = time.monotonic() + 300
    while not checkpoints_in(workspace) - seen:
        assert running.poll() is None and time.monotonic() < deadline, running.stdout.read()[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_the_tracking_server_dying_during_training_is_survived_without_losing_a_metric(cli_env, tmp_path):
    """Documented behaviour: MLflow's client retries every request with exponential backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default: minutes). A server that comes back
    within that window is invisible to the pipeline: training waits at its next metrics
    flush, then everything is delivered, and every run is closed."""
    data_dir = tmp_path / "mlflow"
    data_dir.mkdir()
    server = MlflowServer(data_dir)
    server.start()
    name = f"dying-{uuid.uuid4().hex[:6]}"
    config = write_pipeline_config(tmp_path, name=name)
    steps = 200
    running = gptflow_run(
        config,
        {**cli_env, "MLFLOW_TRACKING_URI": server.uri},
        f"pretrain.max_steps={steps}",
        "pretrain.checkpoint_every=20",
        "finetune=null",
        wait=False,
    )
    try:
        wait_for_a_checkpoint(running, tmp_path / "workspace")
        server.kill()  # training is under way
        time.sleep(2)
        server.start()
        output, _ = running.communicate(timeout=600)
    finally:
        running.kill()
        server.kill()
    assert running.returncode == 0, output[-3000:]

    client = MlflowClient(f"sqlite:///{data_dir / 'mlflow.db'}")  # the server's own store
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    loss_steps = sorted(
        m.step
        for run in runs
        if run.info.run_name == "pretrain"
        for m in client.get_metric_history(run.info.run_id, "loss")
    )
    assert {run.info.status for run in runs} == {"FINISHED"}
    nested = sorted(run.info.run_name for run in runs if "mlflow.parentRunId" in run.data.tags)
    assert len(runs) == len(nested) + 1 and len(set(nested)) == len(nested), nested  # one run per stage
    assert {"ingest", "bpe", "shard", "pretrain", "register"} <= set(nested), nested
    assert loss_steps == list(range(1, steps + 1))  # no metric lost to the outage


# --- runs at once: on one workspace, and under load on the PostgreSQL stack --------------------


def prefect_api(stack, path: str, method: str = "GET", body: dict | None = None) -> dict | None:
    """A request to the stack's Prefect API (with the API's auth string); its JSON answer."""
    auth = base64.b64encode(stack.client_env["PREFECT_API_AUTH_STRING"].encode()).decode()
    request = urllib.request.Request(
        f"{stack.prefect_api_url}/{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


def prefect_flow_run(stack, flow_run_id: str) -> dict:
    """The flow run as the stack's Prefect API returns it."""
    return prefect_api(stack, f"flow_runs/{flow_run_id}")


@pytest.mark.slow
@pytest.mark.skipif(
    postgres_bin_dir() is None, reason="PostgreSQL is not installed; `make test` installs Debian's postgresql"
)
def test_four_pipelines_at_once_on_the_postgres_stack_two_sharing_a_workspace(infra_stack, tmp_path, monkeypatch):
    """Load and a race in one: pipelines `shared` x2 (one config, one workspace), `solo-1` and
    `solo-2`, all started together against one Prefect and one MLflow server on PostgreSQL."""
    suffix = uuid.uuid4().hex[:6]
    shared = write_pipeline_config(tmp_path / "shared", name=f"shared-{suffix}")
    configs = [
        shared,
        shared,
        write_pipeline_config(tmp_path / "solo-1", name=f"solo-1-{suffix}"),
        write_pipeline_config(tmp_path / "solo-2", name=f"solo-2-{suffix}"),
    ]
    env = {**os.environ, **infra_stack.client_env}
    running = [gptflow_run(config, env, "finetune=null", "pretrain.max_steps=8", wait=False) for config in configs]
    outputs = [process.communicate(timeout=900)[0] for process in running]
    for process, output in zip(running, outputs):
        assert process.returncode == 0, output[-3000:]

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, infra_stack.client_env[name])
    client = MlflowClient(infra_stack.client_env["MLFLOW_TRACKING_URI"])
    flow_run_ids = []
    for config, pipelines in ((shared, 2), (configs[2], 1), (configs[3], 1)):
        name = yaml.safe_load(config.read_text())["name"]
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        parents = {run.info.run_id: run for run in runs if "mlflow.parentRunId" not in run.data.tags}
        assert len(parents) == pipelines and {run.info.status for run in runs} == {"FINISHED"}
        for parent_id in parents:  # each pipeline's own stage runs, in its own experiment
            stages = [run.info.run_name for run in runs if run.data.tags.get("mlflow.parentRunId") == parent_id]
            assert {"ingest", "bpe", "shard", "pretrain", "register"} <= set(stages) and len(set(stages)) == len(stages)
        flow_run_ids += [run.data.tags["prefect.flow_run_id"] for run in parents.values()]
        # The registry: versions of this name only, each from this config's data.
        workspace = config.parent / "workspace"
        (ingest,) = (workspace / "ingest").glob("*/manifest.json")
        versions = client.search_model_versions(f"name = '{name}'")
        assert versions and {v.tags["data_fingerprint"] for v in versions} == {ingest.parent.name}
        assert client.get_model_version_by_alias(name, "champion").version == "1"
        # Built once: one committed directory per data stage, and one of the two runs reused it.
        for stage in ("ingest", "bpe", "shard"):
            assert len(list((workspace / stage).glob("*/manifest.json"))) == 1
            reused = sorted(run.data.tags["reused"] for run in runs if run.info.run_name == stage)
            assert reused == (["False", "True"] if pipelines == 2 else ["False"]), (stage, reused)
        assert not temporary_files(workspace)

    assert len(set(flow_run_ids)) == 4
    for flow_run_id in flow_run_ids:
        flow_run = prefect_flow_run(infra_stack, flow_run_id)
        assert flow_run["state"]["type"] == "COMPLETED"


@pytest.mark.slow
def test_runs_left_open_by_a_dead_attempt_are_closed_by_the_rerun(infra_stack, tmp_path):
    """Two attempts die without closing their MLflow runs: the first loses the tracking
    server for longer than the client retries (set to none here), the second is SIGKILLed.
    Each next attempt ends the runs the one before left open as FAILED, saying why; the
    third completes with one finished run per stage.

    Prefect is the stack's server. The killed attempt's `gpu` slot would come back when its
    lease expires, a minute or more later (test_leases covers that); this test is about the
    MLflow runs, so it frees the slot at once."""
    data_dir = tmp_path / "mlflow"
    data_dir.mkdir()
    server = MlflowServer(data_dir)
    server.start()
    name = f"abandoned-{uuid.uuid4().hex[:6]}"
    config = write_pipeline_config(tmp_path, name=name)
    env = {
        **os.environ,
        **infra_stack.client_env,
        "MLFLOW_TRACKING_URI": server.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    # Each attempt trains its own schedule (max_steps is in the stage fingerprint). The first
    # notices the lost server at the latest when it flushes its step metrics at the end of
    # training. The second trains far longer than the test waits, so it is killed while it
    # trains however fast the machine is; resuming the first's final checkpoint would train
    # nothing. The rerun trains a short schedule.
    overrides = ["pretrain.checkpoint_every=20", "finetune=null"]
    try:
        lost_server = gptflow_run(config, env, "pretrain.max_steps=2000", *overrides, wait=False)
        wait_for_a_checkpoint(lost_server, tmp_path / "workspace")
        server.kill()
        output, _ = lost_server.communicate(timeout=300)
        assert lost_server.returncode == 1, output[-3000:]
        assert f"error: the MLflow tracking server stopped answering: API request to {server.uri}" in output
        assert "Traceback" not in output, output[-3000:]
        server.start()

        seen = checkpoints_in(tmp_path / "workspace")
        killed = gptflow_run(config, env, "pretrain.max_steps=1000000", *overrides, wait=False)
        wait_for_a_checkpoint(killed, tmp_path / "workspace", seen)
        killed.kill()
        killed.communicate()

        prefect_api(infra_stack, "v2/concurrency_limits/gpu", "PATCH", {"active_slots": 0})
        rerun = gptflow_run(config, env, "pretrain.max_steps=40", *overrides)
    finally:
        server.kill()
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{data_dir / 'mlflow.db'}")  # the server's own store
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], order_by=["attributes.start_time"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 3
    by_parent = {
        parent.info.run_id: [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        for parent in parents
    }
    first, second, third = parents
    reasons = (
        "is FAILED but never closed this run",
        "that opened it is gone",
    )  # a killed process's flow run stays RUNNING
    for attempt, reason, closer in zip((first, second), reasons, (second, third)):
        left_open = [attempt, *(run for run in by_parent[attempt.info.run_id] if run.info.status != "FINISHED")]
        assert {run.info.run_name for run in left_open} >= {attempt.info.run_name, "pretrain"}
        for run in left_open:
            assert run.info.status == "FAILED", run.info
            assert reason in run.data.tags["gptflow.abandoned"], run.data.tags
            assert closer.data.tags["prefect.flow_run_id"] in run.data.tags["gptflow.abandoned"]  # the next attempt
    assert third.info.status == "FINISHED"
    stages = [run.info.run_name for run in by_parent[third.info.run_id]]
    assert {run.info.status for run in by_parent[third.info.run_id]} == {"FINISHED"}
    assert sorted(stages) == sorted(set(stages)) and {"ingest", "bpe", "shard", "pretrain", "register"} <= set(stages)
    assert "RUNNING" not in {run.info.status for run in runs}
