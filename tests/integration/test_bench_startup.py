"""bench/startup.py's smoke mode: one fresh process per row, and every row of its table printed.
Its figures here (a loaded machine, one process each) mean nothing."""

import subprocess
import sys

from support import REPO


def test_the_startup_benchmark_prints_each_command_against_its_target():
    command = [sys.executable, str(REPO / "bench" / "startup.py"), "--quick"]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, check=True).stdout
    rows = {line.split("│")[1].strip(): line.split("│")[2:] for line in printed.splitlines() if line.count("│") == 7}
    assert set(rows) == {'python -c "import torch"', "gptflow --help", "gptflow generate: first token"}
    assert [rows[name][3].strip() for name in ("gptflow --help", "gptflow generate: first token")] == ["1.5", "3.0"]
    assert all(0 < float(cells[0]) < 300 for cells in rows.values())  # the median, in seconds
