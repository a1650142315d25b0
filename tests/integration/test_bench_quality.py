"""bench/quality.py's smoke mode on a micro config: both recipes take turns for 2 rounds and are scored."""

import subprocess
import sys

import pytest

from support import REPO
from support.configs import write_pipeline_config

pytestmark = pytest.mark.slow  # a child process that prepares data and trains 8 times


def test_quick_mode_alternates_the_recipes_and_prints_their_gain(tmp_path):
    config = write_pipeline_config(tmp_path, "quality-smoke")
    command = [sys.executable, str(REPO / "bench" / "quality.py"), "--quick", "--config", str(config)]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, check=True).stdout
    runs = [line.split() for line in printed.splitlines() if line[:5].strip() in ("1", "2")]
    assert [(run[0], run[1]) for run in runs] == [
        ("1", "baseline"),
        ("1", "default"),
        ("2", "default"),
        ("2", "baseline"),
    ]
    assert all(int(run[2]) >= 1 and 0 < float(run[5]) < 20 for run in runs)  # steps, bits per byte
    assert "baseline" in printed.split("gain vs baseline")[1] and "+0.0% (0.0 pts)" in printed
