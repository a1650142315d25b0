"""Start-up: how long `gptflow --help` takes, and `gptflow generate` to its first token.

Each figure is the median of N fresh processes, the way a user meets them:

- `gptflow --help`, wall time to exit;
- `gptflow generate CHECKPOINT --stream`, from the command's start to the first generated
  token on its standard output (read unbuffered, stamped as it arrives), on a checkpoint of
  the tiny preset (configs/tiny.yaml's shape, random weights: the time does not depend on
  them) with a byte-level BPE tokenizer trained here on the files of Python's standard library;
- `python -c "import torch"`, the floor under anything that runs a model.

    .venv/bin/python bench/startup.py            # the figures (run on a quiet machine)
    .venv/bin/python bench/startup.py --quick    # a smoke check that everything runs

Targets (issue 27): `--help` within 1.5 s, the first token within 3 s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # gptflow, and the tests' tiny checkpoint

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from model.config import PRESETS  # noqa: E402
from support.models import checkpoint_to_generate_from  # noqa: E402

HELP_TARGET_S = 1.5
FIRST_TOKEN_TARGET_S = 3.0
PROMPT = "def fibonacci(n):"


def stdlib_texts(limit: int):
    """The standard library's .py files, in a fixed order, up to `limit` bytes."""
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= limit:
            return


def gptflow(*args: str) -> list[str]:
    """The `gptflow` command as installed next to this interpreter (its console script)."""
    return [str(Path(sys.executable).with_name("gptflow")), *args]


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_to_first_token(command: list[str], prompt: str) -> float:
    """Seconds from starting `command` to the first byte it prints after the echoed `prompt`
    (`--stream` prints the prompt, then each token as it is drawn)."""
    echo = len(prompt.encode())
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
    received = b""
    first = None
    while chunk := os.read(child.stdout.fileno(), 4096):
        received += chunk
        if first is None and len(received) > echo:
            first = time.perf_counter() - start
    if child.wait() != 0 or first is None:
        raise SystemExit(f"{' '.join(command)}: exited {child.returncode} having printed {received[:200]!r}")
    return first


def main(
    repeats: int = typer.Option(5, help="fresh processes per figure (the median is shown)"),
    quick: bool = typer.Option(False, help="smoke mode: one process each, a small tokenizer"),
) -> None:
    repeats = 1 if quick else repeats
    with tempfile.TemporaryDirectory(prefix="gptflow-startup-") as tmp:
        vocab_size, corpus_bytes = (512, 200_000) if quick else (8192, 4_000_000)
        checkpoint = checkpoint_to_generate_from(Path(tmp), PRESETS["tiny"], stdlib_texts(corpus_bytes), vocab_size)
        generate = gptflow(
            "generate", str(checkpoint), "-p", PROMPT, "--stream", "--max-new-tokens", "8", "--seed", "0"
        )
        import_torch = [sys.executable, "-c", "import torch"]
        figures = [
            ('python -c "import torch"', [wall_time(import_torch) for _ in range(repeats)], None),
            ("gptflow --help", [wall_time(gptflow("--help")) for _ in range(repeats)], HELP_TARGET_S),
            (
                "gptflow generate: first token",
                [time_to_first_token(generate, PROMPT) for _ in range(repeats)],
                FIRST_TOKEN_TARGET_S,
            ),
        ]
    table = Table(title=f"start-up, median of {repeats} fresh process(es)")
    for column in ("command", "median s", "min s", "max s", "target s", "met"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, times, target in figures:
        met = "" if target is None else ("yes" if statistics.median(times) <= target else "no")
        table.add_row(
            name,
            f"{statistics.median(times):.2f}",
            f"{min(times):.2f}",
            f"{max(times):.2f}",
            "" if target is None else f"{target:.1f}",
            met,
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    typer.run(main)
