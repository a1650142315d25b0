"""Against real servers: `gptflow up` on free ports, the micro pipeline through them, a served
deployment on a schedule, the `gpu` limit, prefect.yaml's deployment run by a process
worker, `mlflow models serve`, both UIs in headless Chromium (screenshots for the README
go to docs/), then `gptflow down`.

The tests run in file order and share the servers of the module fixture.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from support import REPO
from support.configs import write_pipeline_config
from support.infra_stack import answers
from support.models import greedy_completions
from support.ports import free_port
from support.servers import (
    BIN,
    Servers,
    deployment,
    flow_run_state,
    flow_runs,
    get,
    gptflow,
    mlflow_runs,
    parent_run_of,
    post,
    started_servers,
    stop,
    tags,
    wait_for,
)
from support.sigint import with_sigint
from tasks.core.workspace import sha256_file

pytestmark = pytest.mark.slow

DOCS = REPO / "docs"
NAME = "micro-servers"


def chromium(url: str, *, dump: bool = False, screenshot: Path | None = None) -> str:
    """Render `url` headless; return its DOM, or save a screenshot."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            shutil.which("chromium") or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1400,900",
            "--virtual-time-budget=20000",
            "--dump-dom" if dump else f"--screenshot={screenshot}",
            url,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return completed.stdout


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    with started_servers(tmp_path_factory.mktemp("servers"), NAME, write_pipeline_config) as servers:
        yield servers


@pytest.fixture(scope="module")
def pipeline_run(servers):
    """`gptflow run` with no server in the environment: it finds both through the state file."""
    output = gptflow(servers, "run", str(servers.config)).stdout
    assert f"mlflow run  {servers.mlflow}/#/experiments/" in output
    (flow_run,) = flow_runs(
        servers, {"flow_runs": {"name": {"like_": NAME}}, "flows": {"name": {"any_": ["pipeline"]}}}
    )
    return flow_run


def test_run_and_model_found_through_the_rest_apis(servers, pipeline_run):
    assert pipeline_run["state_type"] == "COMPLETED"
    task_runs = post(f"{servers.prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [pipeline_run["id"]]}}})
    names = [run["name"] for run in task_runs]  # Prefect appends a short suffix to a task's name
    for task in (
        "check-tracking-server",
        "prepare-data",
        "pretrain",
        "evaluate-pretrained",
        "finetune",
        "evaluate-finetuned",
        "register-model",
    ):
        assert any(name.startswith(task) for name in names), (task, names)
    # The data stages run in the prepare-data subflow, which also records them in MLflow.
    [subflow_task] = [run for run in task_runs if run["name"].startswith("prepare-data")]
    [data_flow_run] = post(
        f"{servers.prefect}/api/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": [subflow_task["id"]]}}}
    )
    data_tasks = post(f"{servers.prefect}/api/task_runs/filter", {"flow_runs": {"id": {"any_": [data_flow_run["id"]]}}})
    for task in ("ingest", "train-tokenizer", "track-data"):
        assert any(run["name"].startswith(task) for run in data_tasks), (task, [run["name"] for run in data_tasks])

    parent = parent_run_of(servers, pipeline_run["id"])
    assert parent["info"]["status"] == "FINISHED"
    assert tags(parent)["prefect.flow_run_url"].startswith(f"{servers.prefect}/runs/flow-run/{pipeline_run['id']}")
    champion = get(f"{servers.mlflow}/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion")[
        "model_version"
    ]
    assert champion["version"] == "1" and set(champion["aliases"]) == {"candidate", "champion"}
    register_run = get(f"{servers.mlflow}/api/2.0/mlflow/runs/get?run_id={champion['run_id']}")["run"]
    assert tags(register_run)["mlflow.parentRunId"] == parent["info"]["run_id"]


def test_served_deployment_schedule_trigger_and_gpu_limit(servers, pipeline_run):
    serve_env = {**servers.env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    serving = subprocess.Popen(  # `stop` sends it SIGINT
        with_sigint([str(BIN / "gptflow"), "serve", str(servers.config), "--interval", "3600", "--name", "hourly"]),
        cwd=servers.root,
        env=serve_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        served = wait_for(lambda: deployment(servers, "pipeline/hourly"), 120, "the served deployment")
        # The server's scheduler, not the test, creates the scheduled runs.
        scheduled = wait_for(
            lambda: flow_runs(
                servers,
                {
                    "deployments": {"id": {"any_": [served["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "COMPLETED"]}}},
                },
            ),
            120,
            "scheduled runs of the deployment",
        )
        assert scheduled

        # Two runs that each train (different seeds), the second watched to the end.
        def trigger(seed: int, *extra: str) -> subprocess.Popen:
            params = json.dumps({"overrides": [f"pretrain.seed={seed}", "finetune=null"]})
            return subprocess.Popen(
                [str(BIN / "prefect"), "deployment", "run", "pipeline/hourly", "--params", params, *extra],
                cwd=servers.root,
                env=servers.prefect_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )

        first = trigger(1)
        watched = trigger(2, "--watch")
        watched_output, _ = watched.communicate(timeout=600)
        assert watched.returncode == 0 and "Completed" in watched_output, watched_output
        first_output, _ = first.communicate(timeout=60)
        first_id = first_output.split("UUID:")[1].split()[0]
        watched_id = watched_output.split("UUID:")[1].split()[0]
        wait_for(
            lambda: flow_run_state(servers, first_id) in ("COMPLETED", "FAILED", "CRASHED"),
            600,
            "the first triggered run",
        )
        assert flow_run_state(servers, first_id) == "COMPLETED"

        # The two flow runs ran at the same time, yet the `gpu` limit (one slot) kept their
        # pretraining stages apart.
        assert get(f"{servers.prefect}/api/v2/concurrency_limits/gpu")["limit"] == 1
        flow_spans = [
            _span(get(f"{servers.prefect}/api/flow_runs/{flow_run_id}")) for flow_run_id in (first_id, watched_id)
        ]
        assert max(start for start, _ in flow_spans) < min(end for _, end in flow_spans), (
            f"the runs did not overlap: {flow_spans}"
        )
        spans = []
        for flow_run_id in (first_id, watched_id):
            parent = parent_run_of(servers, flow_run_id)
            (pretrain,) = mlflow_runs(
                servers, f"tags.mlflow.parentRunId = '{parent['info']['run_id']}' and attributes.run_name = 'pretrain'"
            )
            spans.append((int(pretrain["info"]["start_time"]), int(pretrain["info"]["end_time"])))
        (start_a, end_a), (start_b, end_b) = sorted(spans)
        assert end_a <= start_b, f"pretraining overlapped: {spans}"
    finally:
        stop(serving)


def test_prefect_yaml_deploys_a_scheduled_deployment_that_a_process_worker_runs(servers, pipeline_run):
    env = {**servers.prefect_env(), "PWD": str(REPO)}  # `prefect deploy` fills in {{ $PWD }}, as from a shell here

    def prefect(*args: str, timeout: float = 300) -> str:
        completed = subprocess.run(
            [str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert completed.returncode == 0, f"prefect {' '.join(args)}:\n{completed.stdout}\n{completed.stderr}"
        return completed.stdout

    # As prefect.yaml's header says: a process work pool, then deploy from the project directory.
    prefect("work-pool", "create", "gptflow-local", "--type", "process")
    prefect("--no-prompt", "deploy", "--all")
    nightly = get(f"{servers.prefect}/api/deployments/name/pipeline/nightly")
    assert nightly["work_pool_name"] == "gptflow-local"
    assert nightly["parameters"] == {"config": "configs/tiny.yaml", "overrides": []}
    assert [s["schedule"]["cron"] for s in nightly["schedules"] if s["active"]] == ["0 3 * * *"]
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]

    # One run now, on the micro config (everything it needs is built: every stage skips),
    # picked up by a worker of the pool that polls once and waits for it.
    output = prefect("deployment", "run", "pipeline/nightly", "--params", json.dumps({"config": str(servers.config)}))
    flow_run_id = output.split("UUID:")[1].split()[0]
    prefect("worker", "start", "--pool", "gptflow-local", "--run-once", "--limit", "1", timeout=600)
    assert flow_run_state(servers, flow_run_id) == "COMPLETED"
    assert parent_run_of(servers, flow_run_id)["info"]["status"] == "FINISHED"


def _span(flow_run: dict) -> tuple[datetime, datetime]:
    """A flow run's start and end times."""
    return datetime.fromisoformat(flow_run["start_time"]), datetime.fromisoformat(flow_run["end_time"])


def test_mlflow_models_serve_answers_invocations(servers, pipeline_run):
    port = free_port()
    serving = subprocess.Popen(  # `stop` sends it SIGINT
        with_sigint(
            [
                str(BIN / "mlflow"),
                "models",
                "serve",
                "-m",
                f"models:/{NAME}@champion",
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
        ),
        cwd=servers.root,
        env={**servers.env, "MLFLOW_TRACKING_URI": servers.mlflow},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/ping"), 180, "mlflow models serve")
        prompts = ["def plus", ""]
        answer = post(
            f"http://127.0.0.1:{port}/invocations",
            {"inputs": prompts, "params": {"max_new_tokens": 6, "temperature": 0.0}},
        )
        sampled = post(
            f"http://127.0.0.1:{port}/invocations", {"inputs": prompts, "params": {"max_new_tokens": 6, "seed": 0}}
        )
    finally:
        stop(serving)
    # Greedy, the served model answers what generation from the checkpoint it bundles answers.
    (tokenizer,) = (servers.root / "workspace" / "bpe").glob("*/tokenizer.json")
    assert answer["predictions"] == greedy_completions(champion_checkpoint(servers), tokenizer, prompts, 6)
    assert any(answer["predictions"])  # not just an <|endoftext|> each, which would match any model
    assert len(sampled["predictions"]) == 2 and all(isinstance(text, str) for text in sampled["predictions"])


def champion_checkpoint(servers: Servers) -> Path:
    """The workspace checkpoint whose weights the champion bundles (its `weights_sha256` tag)."""
    champion = get(f"{servers.mlflow}/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion")[
        "model_version"
    ]
    weights_sha256 = {tag["key"]: tag["value"] for tag in champion["tags"]}["weights_sha256"]
    found = [
        w.parent for w in (servers.root / "workspace").rglob("model.safetensors") if sha256_file(w) == weights_sha256
    ]
    assert found, f"no checkpoint in the workspace holds the champion's weights {weights_sha256}"
    return found[0]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it)")
def test_both_uis_in_a_browser(servers, pipeline_run):
    DOCS.mkdir(exist_ok=True)
    flow_run_page = f"{servers.prefect}/v2/runs/flow-run/{pipeline_run['id']}?tab=TaskRuns"
    dom = chromium(flow_run_page, dump=True)
    assert pipeline_run["name"] in dom
    for task_name in ("pretrain", "evaluate-pretrained", "finetune", "register-model"):
        assert task_name in dom
    chromium(flow_run_page, screenshot=DOCS / "prefect-flow-run.png")

    runs = mlflow_runs(servers, "attributes.run_name LIKE 'micro-servers-%'")
    run_ids = [run["info"]["run_id"] for run in runs]
    experiment = runs[0]["info"]["experiment_id"]
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment])})
    compare = f"{servers.mlflow}/#/compare-runs?{query}"
    dom = chromium(compare, dump=True)
    assert all(run["info"]["run_name"] in dom for run in runs) and "val_bits_per_byte" in dom

    model_page = f"{servers.mlflow}/#/models/{NAME}"
    dom = chromium(model_page, dump=True)
    assert "champion" in dom and "candidate" in dom and "Version 1" in dom
    chromium(model_page, screenshot=DOCS / "mlflow-registered-model.png")
    assert all(
        (DOCS / name).stat().st_size > 10_000 for name in ("prefect-flow-run.png", "mlflow-registered-model.png")
    )


@pytest.fixture
def browser():
    """Headless Debian chromium driven through chromium-driver, so a test can click."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
    ):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


def page_text_with(driver, *texts: str, timeout: float = 60) -> str:
    """The page's visible text once it shows every one of `texts` (single-page apps render late)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    return driver.find_element(By.TAG_NAME, "body").text


def click_text(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    driver.execute_script(
        "arguments[0].click()", driver.find_element(By.XPATH, f"//*[normalize-space(text())='{text}']")
    )


@pytest.mark.skipif(
    shutil.which("chromedriver") is None, reason="needs Debian's chromium-driver (make test installs it)"
)
def test_progress_artifact_and_a_learning_rate_comparison_in_a_browser(servers, pipeline_run, browser):
    # Prefect: the pretrain task run's progress artifact, at 100 % once the stage is done.
    [artifact] = post(
        f"{servers.prefect}/api/artifacts/filter",
        {"artifacts": {"key": {"any_": ["pretrain-progress"]}, "flow_run_id": {"any_": [pipeline_run["id"]]}}},
    )
    assert artifact["task_run_id"] and artifact["data"] == 100
    browser.get(f"{servers.prefect}/artifacts/artifact/{artifact['id']}")
    page_text_with(browser, "pretrain-progress", "Progress: 100%", pipeline_run["name"])
    browser.save_screenshot(str(DOCS / "prefect-progress.png"))

    # MLflow: a second pipeline run with another learning rate, compared with the first.
    gptflow(servers, "run", str(servers.config), "--set", "pretrain.lr=0.003", "--set", "finetune=null")
    first = parent_run_of(servers, pipeline_run["id"])
    [second] = [
        run for run in mlflow_runs(servers, "params.`pretrain.lr` = '0.003'") if "mlflow.parentRunId" not in tags(run)
    ]
    names = [run["info"]["run_name"] for run in (first, second)]
    run_ids, experiment = [run["info"]["run_id"] for run in (first, second)], first["info"]["experiment_id"]
    compare = (
        f"{servers.mlflow}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment]))}"
    )
    browser.get(compare)
    page_text_with(browser, *names, "Show diff only")
    click_text(browser, "Show diff only")
    shown = page_text_with(browser, "pretrain.lr")
    parameters = shown[shown.index("Parameters") :]
    assert "pretrain.lr 0.01 0.003" in parameters and "bpe.vocab_size" not in parameters  # only what differs

    # The experiment's chart view, in the model-training view: both runs' pretraining loss curves overlaid.
    browser.get(f"{servers.mlflow}/#/experiments/{experiment}/runs")
    page_text_with(browser, "Model training")
    click_text(browser, "Model training")  # the UI remembers the view; its assistant panel is closed
    browser.get(f"{servers.mlflow}/#/experiments/{experiment}/runs?compareRunsMode=CHART")
    page_text_with(browser, "Model metrics")
    if "MLflow Assistant" in page_text_with(browser, "Model metrics"):
        browser.execute_script("arguments[0].click()", browser.find_element("css selector", "button[aria-label=Close]"))
    # Only charts in view are drawn: the search box keeps pretraining's curves at the top.
    browser.find_element("css selector", "input[placeholder='Search metric charts']").send_keys("pretrain_")
    charts = page_text_with(browser, *(f"{name} (pretrain_loss)" for name in names))
    assert "MLflow Assistant" not in charts
    assert all(f"{name} (pretrain_val_loss)" in charts for name in names)
    browser.save_screenshot(str(DOCS / "mlflow-compare-charts.png"))
    browser.get(compare)
    page_text_with(browser, "Show diff only")
    click_text(browser, "Show diff only")
    page_text_with(browser, "pretrain.lr")
    browser.save_screenshot(str(DOCS / "mlflow-compare-runs.png"))
    assert all(
        (DOCS / name).stat().st_size > 10_000
        for name in ("prefect-progress.png", "mlflow-compare-charts.png", "mlflow-compare-runs.png")
    )


def test_a_soak_of_scheduled_runs_with_a_killed_rank_and_a_tracking_outage(servers, pipeline_run, monkeypatch):
    """bench/soak.py at its CI count, 2 runs on these servers: one whose training process is
    SIGKILLed after a checkpoint, then one through an MLflow server outage (last, so that no run
    starts during it: how long a restart takes under load is not this test's question). Plain
    runs are what every other test here runs; docs/reliability.md has the figures of 20."""
    monkeypatch.syspath_prepend(REPO / "bench")
    soak = importlib.import_module("soak")
    # Its own experiment and registered model, over the workspace whose data stages are built.
    config = yaml.safe_load(servers.config.read_text()) | {"name": "micro-soak"}
    (soak_config := servers.root / "soak.yaml").write_text(yaml.safe_dump(config))

    report = soak.soak(servers, soak_config, runs=2, interval=15, kill_run=1, outage_run=2, console=Console())
    killed, outage = report.runs
    assert [run.state for run in report.runs] == ["COMPLETED"] * 2, report
    assert (outage.fault, killed.fault) == ("tracking outage", "killed rank")
    assert killed.retries == 1 and outage.retries == 0
    assert killed.fault_after_step >= 20 and killed.resumed_at_step > killed.fault_after_step  # not from step 1
    assert outage.fault_after_step >= 20  # the server died while the run trained
    assert report.running_mlflow_runs == []
    made = [report.versions_by_flow_run.get(run.flow_run_id) for run in report.runs]
    assert sorted(made) == [["1"], ["2"]] and report.stray_versions == []
    # Nothing lost: each version's weights, downloaded from the registry, are its run's final checkpoint's.
    assert sorted(check.version for check in report.weights) == ["1", "2"]
    assert all(check.checkpoint_sha256 and check.matches() for check in report.weights), report.weights
    assert report.gpu_slots_left == 0
    assert report.failures() == []


def test_down_stops_both_servers(servers):
    state = json.loads((Path(servers.env["GPTFLOW_HOME"]) / "servers.json").read_text())
    assert gptflow(servers, "down").stdout.strip() == "stopped: prefect, mlflow"
    for record in state.values():
        with pytest.raises(ProcessLookupError):
            os.kill(record["pid"], 0)
    assert not (Path(servers.env["GPTFLOW_HOME"]) / "servers.json").exists()
    for url in (servers.prefect + "/api/health", servers.mlflow + "/health"):
        assert not answers(url)
