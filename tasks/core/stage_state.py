"""How a stage task ends in Prefect: a reused stage shows as `Cached`, naming its directory.

Each stage's manifest is its only cache (no Prefect cache keys: the manifest is verified, and
it is shared by every flow that uses the workspace). A stage whose committed output was found
and reused still ends in a Completed state, named `Cached` like Prefect's own cache hits, with
a message that names the reused directory, so the UI tells a reused stage from a rebuilt one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

from prefect.states import Completed, State


class ReusableOutput(Protocol):
    path: Path  # the stage directory
    reused: bool


OutputT = TypeVar("OutputT", bound=ReusableOutput)
P = ParamSpec("P")


def finished(output: OutputT) -> OutputT | State:
    """What a stage task returns: its output, or for a reused one a `Cached` Completed state
    carrying it (the caller of the task gets the output either way)."""
    if not output.reused:
        return output
    return Completed(name="Cached", message=f"reused {output.path}", data=output)


def ending_cached(run_stage: Callable[P, OutputT]) -> Callable[P, OutputT | State]:
    """`run_stage` ending as `finished` does, with its signature (Prefect reads the parameters from it)."""

    @functools.wraps(run_stage)
    def stage(*args: P.args, **kwargs: P.kwargs) -> OutputT | State:
        return finished(run_stage(*args, **kwargs))

    return stage
