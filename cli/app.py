"""The `gptflow` entry point: the table of commands, and how a failure ends.

Each command is a typed function of `cli/commands.py`; Typer reads its options from the
signature. `main` applies the environment defaults before any command imports Prefect or
MLflow, and turns a user error into one `error:` line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import typer

from cli import commands
from flows.harness import harness
from model.errors import UserError
from ops.environment import set_defaults

# The command name -> the function that runs it, in the order `gptflow --help` lists them.
COMMANDS: dict[str, Callable[..., None]] = {
    "prepare": commands.prepare,
    "pretrain": commands.pretrain,
    "evaluate": commands.evaluate,
    "finetune": commands.finetune,
    "run": commands.run,
    "generate": commands.generate,
    "export": commands.export,
    "harness": harness,  # lm-evaluation-harness on the model's HF export (flows/harness.py)
    "serve": commands.serve,
    "runs": commands.runs,
    "status": commands.status,
    "clean": commands.clean,
    "up": commands.up,
    "down": commands.down,
    "config": commands.print_config,
}

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="gptflow: corpus -> tokenizer -> shards -> GPT -> evaluation -> fine-tuning -> registry.",
)
for name, command in COMMANDS.items():
    app.command(name)(command)


def lost_tracking_server(error: BaseException) -> bool:
    """MLflow's REST client gave up reaching the server (its retries spent), as opposed
    to the server answering with an error."""
    from mlflow.exceptions import MlflowException  # on failure only: mlflow is slow to import

    return isinstance(error, MlflowException) and "failed with exception" in str(error)


class WithoutUserErrorTraceback(logging.Filter):
    """Prefect logs every failed flow and task run with its traceback; for a UserError, or
    a tracking server gone, the message is the whole story (a traceback is for bugs), so
    only the message is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (isinstance(record.exc_info[1], UserError) or lost_tracking_server(record.exc_info[1])):
            record.exc_info = record.exc_text = None
        return True


WITHOUT_USER_ERROR_TRACEBACK = WithoutUserErrorTraceback()  # one instance: addFilter skips a repeat


def main() -> None:
    """Console entry point: user errors end as one line `error: ...` and exit code 2."""
    set_defaults()  # before any command imports prefect or mlflow
    for run_logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(run_logger).addFilter(WITHOUT_USER_ERROR_TRACEBACK)
    try:
        app()
    except UserError as e:
        # Plain print, not rich: one line, never wrapped or styled.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if not lost_tracking_server(e):
            raise
        print(
            f"error: the MLflow tracking server stopped answering: {str(e).splitlines()[0]}. "
            "Completed stages are kept; rerun when it is back, and this attempt's runs are closed then.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
