"""All of gptflow's MLflow code, and the only place that talks to MLflow.

`from tasks import tracking` gives the everyday API of its two core modules: runs (open,
nest and end runs; params, metrics, tags, artifacts) and registry (the pyfunc logged,
versions and aliases, registered models loaded). The other modules are imported by name:
stage_run (the nested run every stage task opens), datasets (the data stages' records),
loss_curves, pyfunc (the logged model's own code) and markdown (figures as tables).
"""

from tasks.tracking.registry import (
    download_model,
    find_version,
    load_registered_model,
    load_text_generator,
    log_text_generator,
    model_artifacts,
    register_version,
    set_alias,
    set_version_tags,
    version_for_alias,
)
from tasks.tracking.runs import (
    ABANDONED_TAG,
    MetricsLogger,
    check_tracking_server,
    child_run,
    child_runs,
    client,
    close_abandoned,
    end_run,
    ending,
    experiment_id,
    flatten,
    get_run,
    log_artifact,
    log_dataset,
    log_dict,
    log_figure,
    log_metrics,
    log_params,
    metric_history,
    open_top_level_runs,
    resolve_tracking_uri,
    run_link,
    set_tags,
    start_run,
    truncate,
)

__all__ = [
    "ABANDONED_TAG", "MetricsLogger", "check_tracking_server", "child_run", "child_runs", "client", "close_abandoned",
    "download_model", "end_run", "ending", "experiment_id", "find_version", "flatten", "get_run",
    "load_registered_model", "load_text_generator", "log_artifact", "log_dataset", "log_dict", "log_figure", "log_metrics",
    "log_params", "log_text_generator", "metric_history", "model_artifacts", "open_top_level_runs",
    "register_version", "resolve_tracking_uri", "run_link", "set_alias", "set_tags", "set_version_tags", "start_run",
    "truncate", "version_for_alias",
]
