"""The `gptflow` command line. Each command's typed signature is its interface."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from model.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="gptflow: corpus -> tokenizer -> shards -> GPT -> evaluation -> fine-tuning -> registry.",
)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config field: dotted.key=value (repeatable)."),
]


def main() -> None:
    """Console entry point: user errors end as one line `error: ...` and exit code 2."""
    try:
        app()
    except UserError as e:
        # Plain print, not rich: one line, never wrapped or styled.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
