"""The champion decision alone: figures in, decision out, no MLflow."""

from __future__ import annotations

import pytest

from tasks.register import RegisterConfig, decide_champion


def test_the_first_version_becomes_champion_whatever_its_figure():
    gate = decide_champion("val_bits_per_byte", True, "1", float("nan"), None, None)
    assert gate.promoted
    assert gate.decision == "version 1 is the first champion"


@pytest.mark.parametrize(
    ("metric", "candidate", "champion", "promoted"),
    [
        ("val_bits_per_byte", 1.20, 1.30, True),  # a loss: lower wins
        ("val_bits_per_byte", 1.40, 1.30, False),
        ("val_bits_per_byte", 1.30, 1.30, False),  # a tie keeps the champion
        ("val_accuracy", 0.55, 0.50, True),  # accuracy: higher wins
        ("val_accuracy", 0.45, 0.50, False),
        ("doc_perplexity", 9.0, 10.0, True),
    ],
)
def test_a_candidate_replaces_the_champion_only_when_strictly_better(metric, candidate, champion, promoted):
    lower_is_better = RegisterConfig(gate_metric=metric).lower_is_better
    gate = decide_champion(metric, lower_is_better, "3", candidate, "2", champion)
    assert gate.promoted is promoted
    verb = "replaces" if promoted else "does not beat"
    assert gate.decision == f"version 3 {verb} champion version 2: {metric} {candidate:.4f} vs {champion:.4f}"


def test_a_champion_whose_figure_is_not_comparable_is_kept():
    gate = decide_champion("val_loss", True, "4", 0.1, "2", None)
    assert not gate.promoted
    assert gate.decision.startswith("champion version 2 kept: its tokenizer or context differs")
