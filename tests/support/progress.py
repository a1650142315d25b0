"""The plain progress lines a stage prints off a terminal (tasks/core/train_progress.py), read back."""

from __future__ import annotations

import re


def phase_lines(printed: str, stage: str) -> dict[str, list[tuple[int, int]]]:
    """The plain progress lines of `stage`'s phases: phase -> its (step, total) lines, in order."""
    phases: dict[str, list[tuple[int, int]]] = {}
    for line in printed.splitlines():
        if match := re.fullmatch(rf"{re.escape(stage)}: (.+) (\d+)/(\d+)( \(about \d+ s left\))?", line):
            phases.setdefault(match[1], []).append((int(match[2]), int(match[3])))
    return phases
