"""Pipeline runs side by side in the terminal: what `gptflow runs` prints.

A pipeline run is a top-level MLflow run of the experiment named after the config; its
params are the whole resolved config, its metrics the stages' headline figures and its
`registered_version` tag the model version it registered. The table shows only the
settings that differ between the runs listed (the rest are the same for all, so they
explain nothing), then the headline figures, then the version with its aliases.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from rich.table import Table

from model.errors import UserError
from tasks.tracking.registry import version_aliases
from tasks.tracking.runs import client

# The headline figures of a pipeline run, as its parent run holds them (see the stage tasks).
HEADLINE = ("pretrain_val_loss", "pretrained_val_bits_per_byte", "finetuned_val_bits_per_byte")
# Benchmark scores on the parent run (`pretrained_hellaswag_acc_norm`, ...: tasks/benchmarks.py) join them.
BENCHMARK_SCORE_ENDINGS = ("_acc", "_acc_norm")
MISSING = "-"


def pipeline_runs(experiment: str) -> list[mlflow.entities.Run]:
    """The experiment's pipeline (top-level) runs, newest first."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}: run the pipeline first")
    runs = mlflow_client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    return [run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags]


def find_run(experiment: str, name_or_id: str) -> mlflow.entities.Run:
    """A pipeline run of `experiment` by its name (as the UI lists it) or its id."""
    for run in pipeline_runs(experiment):
        if name_or_id in (run.info.run_name, run.info.run_id):
            return run
    raise UserError(f"no pipeline run named {name_or_id!r} in experiment {experiment!r} (see `gptflow runs`)")


def differing_params(runs: Sequence[mlflow.entities.Run]) -> list[str]:
    """The params whose values are not the same in every run (absent counts as a value)."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def figure(run: mlflow.entities.Run, key: str) -> str:
    value = run.data.metrics.get(key)
    return MISSING if value is None else f"{value:.4g}"


def version_label(run: mlflow.entities.Run, aliases: dict[str, list[str]]) -> str:
    """The version the run registered, with the aliases that point at it now: `3 (champion)`."""
    version = run.data.tags.get("registered_version")
    if not version:
        return MISSING
    return f"{version} ({', '.join(aliases[version])})" if aliases.get(version) else version


def started(run: mlflow.entities.Run) -> str:
    return datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")


def runs_table(experiment: str) -> Table:
    """One row per pipeline run: run, start, status, the settings that differ, headline figures, version."""
    runs = pipeline_runs(experiment)
    differing = differing_params(runs) if len(runs) > 1 else []
    headline = [key for key in HEADLINE if any(key in run.data.metrics for run in runs)]
    scores = {key for run in runs for key in run.data.metrics if key.endswith(BENCHMARK_SCORE_ENDINGS)}
    headline += sorted(scores)
    aliases = version_aliases(experiment)  # the registered model is named after the experiment
    table = Table(title=f"Pipeline runs of {experiment}")
    for column in ("run", "start", "status", *differing, *headline, "version"):
        table.add_column(column, justify="right" if column in headline else "left")
    for run in runs:
        table.add_row(
            run.info.run_name,
            started(run),
            run.info.status,
            *(run.data.params.get(key, MISSING) for key in differing),
            *(figure(run, key) for key in headline),
            version_label(run, aliases),
        )
    return table


def compare_table(experiment: str, first: str, second: str) -> Table:
    """Two pipeline runs side by side: the settings that differ, then every figure either has."""
    runs = [find_run(experiment, first), find_run(experiment, second)]
    aliases = version_aliases(experiment)  # the registered model is named after the experiment
    table = Table(title=f"{runs[0].info.run_name} vs {runs[1].info.run_name}")
    table.add_column("")
    for run in runs:
        table.add_column(run.info.run_name, justify="right")
    for key in differing_params(runs):
        table.add_row(key, *(run.data.params.get(key, MISSING) for run in runs))
    table.add_section()
    for key in sorted({key for run in runs for key in run.data.metrics}):
        table.add_row(key, *(figure(run, key) for run in runs))
    table.add_section()
    table.add_row("status", *(run.info.status for run in runs))
    table.add_row("version", *(version_label(run, aliases) for run in runs))
    return table
