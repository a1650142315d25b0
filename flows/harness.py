"""`gptflow harness`: a model scored by lm-evaluation-harness, the tool the field compares models with.

The model (a checkpoint or stage directory, a Hugging Face directory or hub name, a
`models:/` URI) is exported to a temporary Hugging Face directory (tasks/models/hf_export.py:
a model with sparse layers is refused there), lm-eval's `hf` model runs the tasks on it,
the results table is printed, and every figure (`<task>_<metric>`: `hellaswag_acc_norm`,
`hellaswag_acc_norm_stderr`, ...) and lm-eval's results JSON go to an MLflow run: nested
under the model's own run for a `models:/` URI, else in the experiment `harness`.

lm-eval is an optional extra (`pip install 'gptflow[harness]'`); `make install` installs it.
The function's signature is the command's: typer reads it (cli/app.py's table names it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from model.errors import UserError

EXPERIMENT = "harness"  # the MLflow experiment of a model that is not registered
EXTRA = "harness"  # pyproject.toml's optional dependencies that hold lm-eval


def harness(
    model: Annotated[
        str, typer.Argument(help="A checkpoint or stage directory, a HF directory, or models:/NAME@ALIAS.")
    ],
    tasks: Annotated[str, typer.Option(help="lm-eval task names, comma-separated (e.g. hellaswag,lambada_openai).")],
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples of each task.")] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Examples shown before each one (the task's default).")
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="A directory of extra task YAML files (local tasks).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="Where lm-eval runs the model: cpu, cuda, cuda:N.")] = "cpu",
) -> dict[str, float]:
    """Score MODEL with lm-evaluation-harness on TASKS, print the table, log the figures to MLflow."""
    lm_eval = import_lm_eval()
    from lm_eval.utils import make_table

    from tasks import tracking
    from tasks.models.hf_export import export_model
    from tasks.models.sources import is_registry_uri, open_model

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    if not names:
        raise UserError("gptflow harness: --tasks names no task")
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--include-path: {include_path} is not a directory")
    source = open_model(model)
    with tempfile.TemporaryDirectory(prefix="gptflow-harness-") as tmp:
        exported = export_model(source, Path(tmp) / "model")
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(exported), "dtype": "float32"},
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            task_manager=lm_eval.tasks.TaskManager(include_path=str(include_path) if include_path else None),
        )
    if results is None:  # lm-eval returns None on the ranks other than the first; gptflow runs one
        raise UserError("gptflow harness: lm-eval returned no results")
    print(make_table(results))
    figures = harness_figures(results["results"])
    parent = source.lineage.get("mlflow_run_id") if is_registry_uri(model) else None
    params = {"model": model, "tasks": ",".join(names), "limit": limit, "num_fewshot": num_fewshot}
    if parent:
        run_context = tracking.child_run(parent, "harness")
    else:
        run_context = tracking.ending(tracking.start_run(EXPERIMENT, f"harness {Path(model).name or model}"))
    with run_context as run_id:
        tracking.log_params(run_id, params)
        tracking.log_metrics(run_id, figures)
        tracking.log_dict(run_id, json_safe(results), "harness/results.json")
    print(f"logged    {tracking.run_link(run_id)}")
    return figures


def import_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise UserError(
            f"gptflow harness needs lm-evaluation-harness: pip install 'gptflow[{EXTRA}]' (or `make install`)"
        ) from None
    return lm_eval


def harness_figures(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's per-task figures, `{"acc,none": 0.3, "acc_stderr,none": 0.01, "alias": ...}`, as
    `<task>_acc`, `<task>_acc_stderr`: the numbers only, the filter name (`none`) dropped."""
    figures = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, _ = key.partition(",")
            if comma and isinstance(value, int | float) and not isinstance(value, bool):
                figures[f"{task}_{metric}"] = float(value)
    return figures


def json_safe(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results with what JSON cannot hold (task configs' functions, numpy values) as text."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))
