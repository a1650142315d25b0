"""Loss-curve plots of the training stages, drawn from what their MLflow runs logged.

After training, the pipeline plots each training stage's step-wise `loss` (and `val_loss`
where it was measured) from the stage's nested run, and saves the figure to that run and
to the pipeline's run. A stage that was reused (skipped) trained nothing in this run and
gets no plot.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import runs

CURVES = ("loss", "val_loss")


def loss_figure(title: str, curves: dict[str, list[tuple[int, float]]]) -> Figure:
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for key, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
    axes.set(title=title, xlabel="step", ylabel="cross-entropy (nats per token)")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


@task(name="plot-loss-curves", cache_policy=NO_CACHE)
def loss_curves_task(parent_run_id: str, stages: tuple[str, ...] = ("pretrain", "finetune")) -> list[str]:
    """Plot each stage that trained in this run; returns the stages plotted."""
    stage_runs = runs.child_runs(parent_run_id)
    plotted = []
    for stage in stages:
        if stage not in stage_runs:
            continue
        # Step 0 holds the stage's summary figures (see runs.log_metrics), not a training step.
        histories = {
            key: [(step, value) for step, value in runs.metric_history(stage_runs[stage], key) if step > 0]
            for key in CURVES
        }
        curves = {key: points for key, points in histories.items() if points}
        if "loss" not in curves:  # reused: nothing was trained in this run
            continue
        figure = loss_figure(f"{stage} loss", curves)
        runs.log_figure(stage_runs[stage], figure, "loss_curve.png")
        runs.log_figure(parent_run_id, figure, f"{stage}_loss_curve.png")
        plotted.append(stage)
    return plotted
