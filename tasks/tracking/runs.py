"""MLflow runs: open, nest, end, and log params, metrics, tags and artifacts to them.

Every call names its run explicitly (`run_id`) and goes through `MlflowClient`: MLflow's
"active run" is per thread, and Prefect runs tasks in worker threads, where the fluent API
would silently open a fresh run. Nesting is MLflow's own convention, the
`mlflow.parentRunId` tag, which the UI draws as a tree.

Where runs go: `MLFLOW_TRACKING_URI` when set (the entry points set it to the MLflow server
`gptflow up` started, ops/environment.py); else a SQLite database `mlflow.db` in the working
directory (MLflow's embedded default), with artifacts in `mlruns/` next to the database.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.async_logging.run_operations import RunOperations
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from model.errors import UserError

# How often a training loop checks that the steps it queued for MLflow were delivered.
METRICS_CHECK_SECONDS = 5.0
# Why a run that its own process never closed was ended by a later one.
ABANDONED_TAG = "gptflow.abandoned"
# The experiment tag the MLflow UI reads to choose its view: this one is the model-training view.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri() -> str:
    """The environment's URI (where the entry points put `gptflow up`'s server), else the
    embedded SQLite default."""
    if uri := mlflow.environment_variables.MLFLOW_TRACKING_URI.get():
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client() -> MlflowClient:
    """A client on the resolved URI; also points MLflow's module-level API there
    (model logging and loading go through it)."""
    uri = resolve_tracking_uri()
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def check_tracking_server(uri: str | None = None, attempts: int = 5, delay: float = 2.0) -> str:
    """Make sure the tracking store answers before any work starts; returns the URI.

    An HTTP server is asked for `/health` directly (MLflow's own REST client would retry
    for minutes); a database store is opened and queried. After `attempts` tries, the
    waits between them doubling from `delay` seconds (2 + 4 + 8 + 16 s by default: long
    enough for a server that is restarting, as a scheduled run may find it), the problem is
    reported naming the URI.
    """
    uri = uri or resolve_tracking_uri()
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(delay * 2 ** (attempt - 1))
        try:
            if uri.startswith(("http://", "https://")):
                with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                    response.read()
            else:
                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            return uri
        except (OSError, urllib.error.URLError, MlflowException) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(
        f"MLflow tracking server {uri} is unreachable after {attempts} attempts ({problem}); "
        "start it with `gptflow up` (or forget it with `gptflow down`), or set MLFLOW_TRACKING_URI"
    )


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created on first use (safe when two runs race), marked
    as model training so that the MLflow UI opens it in its model-training view (not GenAI)."""
    mlflow_client = client()
    if experiment := mlflow_client.get_experiment_by_name(name):
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an earlier gptflow, or by hand
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=_artifact_location(name), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def _artifact_location(experiment: str) -> str | None:
    """For a SQLite store, artifacts next to the database (MLflow would use `./mlruns` of
    whatever directory the process runs in); a server decides for itself."""
    uri = resolve_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return (database.parent / "mlruns" / experiment).resolve().as_uri()


def start_run(
    experiment: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Open a run in `experiment` (nested under `parent_run_id` if given); returns its id."""
    all_tags = {key: truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in (tags or {}).items()}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client().create_run(experiment_id(experiment), tags=all_tags, run_name=run_name)
    return run.info.run_id


@contextmanager
def child_run(parent_run_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A stage's nested run under the pipeline's run, in the same experiment; ended by `ending`."""
    experiment = get_run(parent_run_id).info.experiment_id
    run = client().create_run(experiment, tags={**(tags or {}), MLFLOW_PARENT_RUN_ID: parent_run_id}, run_name=run_name)
    with ending(run.info.run_id):
        yield run.info.run_id


@contextmanager
def ending(run_id: str) -> Iterator[str]:
    """End `run_id` by how the block ends: FINISHED, FAILED on an exception, or KILLED when
    the process is stopped (Ctrl-C, a cancelled flow run's SIGTERM), so the UI never shows
    a run as still running."""
    try:
        yield run_id
    except BaseException as e:
        # Prefect's TerminationSignal (a cancelled flow run) is a BaseException too, but
        # not an Exception; neither are Ctrl-C and SystemExit.
        end_run(run_id, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    end_run(run_id)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run as FINISHED, FAILED or KILLED."""
    RunStatus.from_string(status)  # refuses a misspelt status before it reaches the store
    client().set_terminated(run_id, status=status)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    tag_list = [RunTag(key, truncate(str(value), MAX_TAG_VAL_LENGTH)) for key, value in tags.items()]
    client().log_batch(run_id, tags=tag_list)


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [1, 2]}` -> `{"a.b": 1, "c": [1, 2]}` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log a (nested) config as flattened dotted params.

    MLflow stores at most 6000 characters per value: longer ones (a long prompt list) are
    cut with "..." here rather than failing the run; the resolved config is logged whole as
    an artifact. The client splits the batch into MLflow's 100-param requests.
    """
    param_list = [Param(key, truncate(str(value), MAX_PARAM_VAL_LENGTH)) for key, value in flatten(params).items()]
    client().log_batch(run_id, params=param_list)


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0, model_id: str | None = None) -> None:
    """Log summary metrics (evaluation results) in one request; with `model_id`, linked to
    that logged model too, so MLflow's models view ranks models by them.

    A training stage logs its final figures at its last `step`: one that is also a step curve
    (`val_loss`) then ends that curve with the value it already has there, instead of adding
    a point at step 0, where the curve starts (the initial weights' validation)."""
    now = int(time.time() * 1000)
    client().log_batch(
        run_id, metrics=[Metric(key, float(value), now, step, model_id=model_id) for key, value in metrics.items()]
    )


def log_steps(run_id: str, points: list[tuple[str, int, float]]) -> None:
    """Step-wise (key, step, value) points in one call (the client splits it into MLflow's batches)."""
    if points:
        now = int(time.time() * 1000)
        client().log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, step, value in points])


class MetricsLogger:
    """A progress callback for training loops: `logger(step, {"loss": 2.3, "lr": 1e-3})`.

    Each step goes to MLflow's async logging, which returns at once; MLflow's logging thread
    merges the queued steps into a request every MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS
    (ops/environment.py sets it) and retries a request as any other. Every
    METRICS_CHECK_SECONDS the logger waits for the steps queued before the previous check
    (by then normally delivered, so training does not wait), and at the end for all of them
    (use it as a context manager, or call `flush()`). Steps MLflow could not deliver are
    sent once more, synchronously: that succeeds when the server came back, or raises the
    client's own error when it is gone, so no step is lost without an error.
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._client = client()
        # (MLflow's handle on a queued batch, the batch): the older ones, then the ones queued since.
        self._older: list[tuple[RunOperations, list[Metric]]] = []
        self._recent: list[tuple[RunOperations, list[Metric]]] = []
        self._last_check = time.monotonic()

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        self._recent.append((self._client.log_batch(self.run_id, metrics=batch, synchronous=False), batch))
        if time.monotonic() - self._last_check >= METRICS_CHECK_SECONDS:
            self._deliver(self._older)
            self._older, self._recent = self._recent, []
            self._last_check = time.monotonic()

    def flush(self) -> None:
        """Wait until every step logged so far is stored."""
        self._deliver(self._older + self._recent)
        self._older, self._recent = [], []

    def _deliver(self, queued: list[tuple[RunOperations, list[Metric]]]) -> None:
        undelivered = []
        for operations, batch in queued:
            try:
                operations.wait()
            except MlflowException:  # MLflow logged why; the synchronous retry raises it if it persists
                undelivered.extend(batch)
        if undelivered:
            self._client.log_batch(self.run_id, metrics=undelivered)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """MLflow's system-metrics monitor on `run_id` while the block runs: `system/cpu_utilization_percentage`,
    memory, disk and network, and GPU utilisation and memory when nvidia-ml-py is installed (the `gpu`
    extra). It samples every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (10 by default).

    The monitor is started on the run by id: `mlflow.start_run(log_system_metrics=True)` would also
    make the run the thread's active run and end it on its own terms."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=resolve_tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_artifact(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    """Upload a file, or a directory's contents, to the run's artifacts."""
    path = Path(path)
    if path.is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    else:
        client().log_artifact(run_id, str(path), artifact_path)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    """Save a dict as a JSON or YAML artifact (by the file's extension)."""
    client().log_dict(run_id, data, artifact_file)


def log_table(run_id: str, columns: Mapping[str, list], artifact_file: str) -> None:
    """A table (column name -> values) as MLflow's JSON table artifact, which the UI's
    evaluation view shows and lines up across runs."""
    client().log_table(run_id, dict(columns), artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure (a loss curve) as an image artifact."""
    client().log_figure(run_id, figure, artifact_file)


def log_dataset(
    run_id: str,
    name: str,
    digest: str,
    source: Path | str,
    context: str,
    profile: Mapping[str, Any] | None = None,
) -> None:
    """Record a dataset the run read (the corpus, the shards) by name, digest and location.

    Only metadata is logged: the data stays in the workspace and `digest` (a stage
    fingerprint or sha256) says exactly which version was used. `context` is the role shown
    in the UI, e.g. "pretrain" or "eval".
    """
    # MLflow's dataset of metadata only: a name, a digest and where the data lies.
    record = MetaDataset(_dataset_source(str(source)), name=name, digest=digest[:MAX_DATASET_DIGEST_SIZE]).to_dict()
    profile_json = json.dumps(profile, sort_keys=True, default=str) if profile is not None else None
    dataset = Dataset(**record, profile=profile_json)
    inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])]
    try:
        client().log_inputs(run_id, inputs)
    except MlflowException as e:
        # The server's get-or-create of a dataset is not atomic: two runs logging the same
        # dataset at once can both try to insert it. The second attempt finds it and links it.
        if "already exists" not in str(e) and "UniqueViolation" not in str(e) and "UNIQUE constraint" not in str(e):
            raise
        client().log_inputs(run_id, inputs)


def _dataset_source(source: str) -> DatasetSource:
    if source.startswith(("http://", "https://")):
        return HTTPDatasetSource(source)
    # A local path resolves to MLflow's local source; the registry warns that two
    # registrations match the same "file" scheme, which is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(str(Path(source).resolve()))


def get_run(run_id: str) -> mlflow.entities.Run:
    return client().get_run(run_id)


def experiment_name(run_id: str) -> str:
    """The name of the experiment run `run_id` is in: gptflow's config name."""
    mlflow_client = client()
    return mlflow_client.get_experiment(mlflow_client.get_run(run_id).info.experiment_id).name


def child_runs(parent_run_id: str) -> dict[str, str]:
    """The nested runs under `parent_run_id`: run name -> run id."""
    mlflow_client = client()
    experiment = mlflow_client.get_run(parent_run_id).info.experiment_id
    runs = mlflow_client.search_runs([experiment], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'")
    return {run.info.run_name: run.info.run_id for run in runs}


def open_top_level_runs(experiment: str) -> list[mlflow.entities.Run]:
    """The runs of `experiment` still marked RUNNING that are not nested under another."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    running = mlflow_client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return [run for run in running if MLFLOW_PARENT_RUN_ID not in run.data.tags]


def close_abandoned(run_id: str, reason: str) -> list[str]:
    """End `run_id` and its nested runs still RUNNING as FAILED, tagged with `reason`;
    returns the ids closed."""
    mlflow_client = client()
    experiment = mlflow_client.get_run(run_id).info.experiment_id
    nested = mlflow_client.search_runs(
        [experiment], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and attributes.status = 'RUNNING'"
    )
    closed = [run.info.run_id for run in nested] + [run_id]
    for closing in closed:
        set_tags(closing, {ABANDONED_TAG: reason})
        end_run(closing, "FAILED")
    return closed


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for `key`, in step order."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def run_link(run_id: str) -> str:
    """Where a person sees the run: the UI page when the server is HTTP, else `runs:/ID`."""
    uri = resolve_tracking_uri()
    if uri.startswith(("http://", "https://")):
        experiment = get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"runs:/{run_id} (tracking store {uri}; browse with `mlflow ui --backend-store-uri {uri}`)"
