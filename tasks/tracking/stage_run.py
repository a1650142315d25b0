"""The nested MLflow run of a stage task, and the Prefect markdown artifact that reports it.

Every stage `*_task` reads the same way: open the stage's run under the pipeline's run,
log the config as params, run the plain `run_<stage>` function, then `finish` with its
figures, the headline figures for the parent run, the files to keep and a markdown report:

    with stage_run(parent_run_id, "evaluate", {"evaluate": config.model_dump()}) as run:
        output = run_evaluate(...)
        run.finish(output.metrics, parent_metrics={...}, artifacts={output.samples: "evaluate"},
                   report=Report("evaluate", "Evaluation of ...", "evaluation figures and samples"))
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import task_run

from tasks.tracking import runs


def metrics_markdown(title: str, metrics: Mapping[str, float]) -> str:
    rows = "".join(f"| {name} | {value:.4f} |\n" for name, value in metrics.items())
    return f"## {title}\n\n| metric | value |\n|---|---|\n{rows}"


def artifact_key(name: str, kind: str) -> str:
    """The key of config `name`'s `kind` of artifact, so that two experiments' reports never share
    one key's history: Prefect keys are lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{kind}".lower())


@dataclass(frozen=True)
class Report:
    """The Prefect markdown artifact of a stage: `markdown` is followed by the MLflow run's link."""

    key: str  # the kind of report; its artifact key is per config (`artifact_key`)
    markdown: str
    description: str


@dataclass(frozen=True)
class StageRun:
    run_id: str
    parent_run_id: str

    def finish(
        self,
        metrics: Mapping[str, float],
        parent_metrics: Mapping[str, float],
        artifacts: Mapping[Path, str | None],
        report: Report | None = None,
        tables: Mapping[str, Mapping[str, list]] | None = None,
        step: int = 0,
    ) -> None:
        """Log the stage's figures on its run and the headline ones on the parent run, at `step`
        (a training stage's last step: see `runs.log_metrics`), upload `artifacts` (file ->
        artifact directory, None for the root), log `tables` (artifact file -> columns, MLflow's
        tables: the UI lines them up across runs) and publish `report`."""
        runs.log_metrics(self.run_id, metrics, step=step)
        runs.log_metrics(self.parent_run_id, parent_metrics, step=step)
        for path, directory in artifacts.items():
            runs.log_artifact(self.run_id, path, directory)
        for artifact_file, columns in (tables or {}).items():
            runs.log_table(self.run_id, columns, artifact_file)
        if report is not None:
            create_markdown_artifact(
                key=artifact_key(runs.experiment_name(self.parent_run_id), report.key),
                markdown=f"{report.markdown}\nMLflow run: {runs.run_link(self.run_id)}\n",
                description=report.description,
            )


@contextmanager
def stage_run(
    parent_run_id: str, name: str, params: Mapping[str, Any], system_metrics: bool = False
) -> Iterator[StageRun]:
    """The stage's nested run named `name`, with `params` logged; ended by how the block ends.
    With `system_metrics` (the training stages), MLflow's system metrics are logged on it too."""
    with runs.child_run(parent_run_id, name) as run_id:
        runs.log_params(run_id, params)
        with runs.system_metrics(run_id) if system_metrics else nullcontext():
            yield StageRun(run_id, parent_run_id)


def log_attempt(run_id: str) -> None:
    """Mark a retry on the stage's MLflow run: which attempt this is (the failed ones' runs ended FAILED)."""
    attempt = task_run.run_count
    if attempt > 1:
        runs.set_tags(run_id, {"gptflow.attempt": str(attempt), "gptflow.retry": f"retry {attempt - 1}, resuming"})
        runs.log_metrics(run_id, {"attempt": attempt})
