"""Benchmark: the data stages on a hostile corpus against the same corpus without its hostile files.

    .venv/bin/python bench/hostile.py            # the standard library + the hostile files
    .venv/bin/python bench/hostile.py --quick    # a slice of the standard library, a 6 MB line

Hostile files (issue 19): a text file holding one 60 MB line of one repeated character, a
base64 blob (8 MB, one line), and a minified-JavaScript-like file (4 MB, one line). Each
corpus runs ingest, bpe and shard in a fresh process; per stage it prints the seconds and the
peak memory (VmHWM, reset before each stage through /proc/self/clear_refs). Twice: with the
default ingest filters (which drop the hostile files: then the other stages see the clean
corpus) and with every filter off (then the pre-token bound alone keeps the stages bounded).
Target: hostile at most 2x the time of clean.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Annotated

import typer

REPO = Path(__file__).resolve().parents[1]

STAGES_IN_A_FRESH_PROCESS = """
import json, sys, time
from pathlib import Path
from tasks.bpe import BPEConfig, run_bpe
from tasks.ingest import IngestConfig, run_ingest
from tasks.ingest_filters import FilterConfig
from tasks.shard import ShardConfig, run_shard

def peak():
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))

source, workspace, filters = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "on"
ingest = IngestConfig(source=source, filters=FilterConfig() if filters else FilterConfig.off())
figures, outputs = {}, {}
steps = [
    ("ingest", lambda: run_ingest(ingest, workspace)),
    ("bpe", lambda: run_bpe(BPEConfig(), outputs["ingest"], workspace)),
    ("shard", lambda: run_shard(ShardConfig(), outputs["ingest"], outputs["bpe"], workspace)),
]
for stage, run in steps:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    outputs[stage] = run()
    figures[stage] = {"seconds": time.perf_counter() - started, "peak": peak()}
figures["documents"] = outputs["ingest"].report["documents_out"]
print(json.dumps(figures))
"""


def write_hostile_files(directory: Path, line_mb: int) -> None:
    rng = random.Random(0)
    (directory / "one-char-line.txt").write_text("a" * (line_mb << 20))
    (directory / "blob.txt").write_text(base64.b64encode(rng.randbytes(6 << 20)).decode())
    names = ["a", "b", "c", "e", "n", "t", "x", "fn", "el", "ctx"]
    statements = [f"var {rng.choice(names)}{i}=function({rng.choice(names)}){{return {i}*{rng.choice(names)}+1}};"
                  for i in range(4 << 20 >> 5)]  # fmt: skip
    (directory / "app.min.js.txt").write_text("".join(statements))


def stages(source: Path, filters: str) -> dict:
    with tempfile.TemporaryDirectory() as workspace:
        result = subprocess.run(
            [sys.executable, "-c", STAGES_IN_A_FRESH_PROCESS, str(source), workspace, filters],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
    return json.loads(result.stdout.splitlines()[-1])


def main(quick: Annotated[bool, typer.Option(help="A slice of the standard library and a 6 MB line.")] = False) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as scratch:
        clean, hostile = Path(scratch) / "clean", Path(scratch) / "hostile"
        files = sorted(stdlib.glob("[a-c]*.py" if quick else "*.py"))
        for directory in (clean, hostile):
            directory.mkdir()
            for path in files:
                shutil.copy(path, directory)
        write_hostile_files(hostile, 6 if quick else 60)
        size = sum(path.stat().st_size for path in hostile.iterdir()) - sum(path.stat().st_size for path in files)
        print(f"clean: {len(files)} standard-library files; hostile: the same + {size / 1e6:.0f} MB of hostile files")
        for filters in ("on", "off"):
            figures = {name: stages(source, filters) for name, source in (("clean", clean), ("hostile", hostile))}
            print(f"\nfilters {filters}: documents kept clean {figures['clean']['documents']}, "
                  f"hostile {figures['hostile']['documents']}")  # fmt: skip
            for stage in ("ingest", "bpe", "shard"):
                c, h = figures["clean"][stage], figures["hostile"][stage]
                print(f"  {stage:<7} clean {c['seconds']:6.1f} s {c['peak'] / 2**20:5.0f} MiB   hostile "
                      f"{h['seconds']:6.1f} s {h['peak'] / 2**20:5.0f} MiB   {h['seconds'] / c['seconds']:.2f}x the time")
            total = [sum(figures[name][stage]["seconds"] for stage in ("ingest", "bpe", "shard")) for name in ("clean", "hostile")]
            print(f"  all     clean {total[0]:6.1f} s   hostile {total[1]:6.1f} s   {total[1] / total[0]:.2f}x (target <= 2x)")


if __name__ == "__main__":
    typer.run(main)
