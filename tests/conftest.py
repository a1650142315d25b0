"""Test session settings and the one Prefect server every flow test shares.

Prefect reads its settings at import, so the environment is set here at module level,
before any test module imports prefect.
"""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="gptflow-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_DIR / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_DIR / 'mlflow.db'}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # Servers a developer started with `gptflow up` must not receive test runs.
        "GPTFLOW_HOME": str(_SESSION_DIR / "gptflow-home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from ops.environment import apply_defaults  # noqa: E402

apply_defaults()  # the rest of gptflow's defaults, as every entry point applies them


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API server for the whole session; yields its URL.

    Flows called in-process use it through the harness's settings context; CLI
    subprocesses get it as PREFECT_API_URL (see `cli_env`).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def cli_env(prefect_server):
    """Environment for `gptflow` subprocesses: the session's Prefect server, no new one."""
    return {**os.environ, "PREFECT_API_URL": prefect_server}


@pytest.fixture(scope="session")
def infra_stack(tmp_path_factory):
    """infra/'s stack without Docker (PostgreSQL, S3 API, Prefect and MLflow servers with
    auth; see tests/support/infra_stack.py), started once for every test module that needs it."""
    from support.infra_stack import running_stack

    with running_stack(tmp_path_factory.mktemp("infra")) as stack:
        yield stack


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT2LMHeadModel with its byte-level BPE tokenizer, as a Hugging Face
    directory (tests/support/hf.py): built once, read by every test that needs one."""
    from support.hf import tiny_gpt2_directory

    return tiny_gpt2_directory(tmp_path_factory.mktemp("hf") / "tiny-gpt2")
