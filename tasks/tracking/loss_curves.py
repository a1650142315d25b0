"""Loss-curve figures of the training stages, drawn from what their MLflow runs logged.

While a training stage runs, `live_loss_curves` redraws its run's `loss_curve.png` every
`REFRESH_SECONDS` from the step metrics logged so far: `loss` and `val_loss` in one panel,
`lr` and `grad_norm` in two more. It reads the run's history from MLflow rather than from
the training loop, so it works the same when torchrun's rank 0 logs the steps. At the end
the final figure goes to the stage's run and to the pipeline's run, and chosen curves are
copied to the pipeline's run as step metrics (pretraining's `loss` and `val_loss`), so
comparing pipeline runs in MLflow overlays them. A stage that was reused trained nothing
in this run and gets no figure.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException

from tasks.core.periodic import repeating
from tasks.tracking import runs
from tasks.tracking.stage_run import StageRun

CURVES = ("loss", "val_loss", "lr", "grad_norm")
REFRESH_SECONDS = 30.0
FIGURE = "loss_curve.png"


def loss_figure(title: str, curves: Mapping[str, list[tuple[int, float]]]) -> Figure:
    """Three panels over the steps: cross-entropy (loss, val_loss), learning rate, gradient norm."""
    figure = Figure(figsize=(7, 7), layout="constrained")
    panels = figure.subplots(3, 1, sharex=True)
    for axes, keys, label in zip(
        panels,
        (("loss", "val_loss"), ("lr",), ("grad_norm",)),
        ("cross-entropy (nats per token)", "learning rate", "gradient norm"),
    ):
        for key in keys:
            if points := curves.get(key):
                steps, values = zip(*points)
                axes.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
        axes.set(ylabel=label)
        axes.grid(alpha=0.3)
        if len(keys) > 1:
            axes.legend()
    panels[0].set_title(title)
    panels[-1].set_xlabel("step")
    return figure


def step_curves(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The run's training curves so far (step 0: the initial weights' validation)."""
    histories = {key: list(runs.metric_history(run_id, key)) for key in CURVES}
    return {key: points for key, points in histories.items() if points}


class CurveRefresher:
    """Redraws one stage's figure and copies its new curve points to the pipeline's run."""

    def __init__(self, stage: StageRun, title: str, parent_curves: Mapping[str, str]):
        self.stage, self.title, self.parent_curves = stage, title, parent_curves
        self.copied = {key: -1 for key in parent_curves}  # the last step copied, per curve

    def refresh(self) -> Figure | None:
        curves = step_curves(self.stage.run_id)
        if "loss" not in curves:  # nothing trained (yet, or at all: a reused stage)
            return None
        figure = loss_figure(self.title, curves)
        runs.log_figure(self.stage.run_id, figure, FIGURE)
        new_points = []
        for key, parent_key in self.parent_curves.items():
            new_points += [(parent_key, step, value) for step, value in curves.get(key, []) if step > self.copied[key]]
            self.copied[key] = max([self.copied[key], *(step for step, _ in curves.get(key, []))])
        runs.log_steps(self.stage.parent_run_id, new_points)
        return figure


@contextmanager
def live_loss_curves(
    stage: StageRun, name: str, parent_curves: Mapping[str, str] | None = None, refresh_seconds: float = REFRESH_SECONDS
) -> Iterator[None]:
    """While the block trains, `name`'s figure on its run every `refresh_seconds`; at the end the final
    figure on both runs. `parent_curves` maps a stage curve to the step metric it becomes on the
    pipeline's run, e.g. {"loss": "pretrain_loss"}."""
    refresher = CurveRefresher(stage, f"{name} loss", parent_curves or {})
    # MlflowException: a server outage; training goes on and the next refresh catches up.
    with repeating(refresher.refresh, refresh_seconds, f"{name} loss curves", forgiven=MlflowException):
        yield
    if figure := refresher.refresh():
        runs.log_figure(stage.parent_run_id, figure, f"{name}_{FIGURE}")
