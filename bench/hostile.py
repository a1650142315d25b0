"""Benchmark: the data stages on a hostile corpus against the same corpus without its hostile files.

    .venv/bin/python bench/hostile.py            # or: bench/prepare.py --hostile
    .venv/bin/python bench/hostile.py --quick    # a slice of the standard library, a 6 MiB line

Hostile files (issue 19): a text file holding one 60 MiB line of one repeated character
(+line), then also a base64 blob and a minified-JavaScript-like file, 4 MB and one line each
(+line+blobs). Each corpus runs ingest, bpe and shard in a fresh process; per stage it prints
the seconds and the peak memory (VmHWM, reset before each stage through /proc/self/clear_refs).
With the default ingest filters (which drop the hostile files: the later stages then see the
clean corpus), and with every filter off (then the pre-token bound alone keeps the tokenizer
from stalling; the extra megabytes still cost their time). Target: hostile at most 2x the
time of clean.
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


def write_one_char_line(directory: Path, megabytes: int) -> None:
    (directory / "one-char-line.txt").write_text("a" * (megabytes << 20))


def write_blobs(directory: Path) -> None:
    """A base64 blob and a minified-JavaScript-like file, 4 MB each, one line each."""
    rng = random.Random(0)
    (directory / "blob.txt").write_text(base64.b64encode(rng.randbytes(3 << 20)).decode())
    names = ["a", "b", "c", "e", "n", "t", "x", "fn", "el", "ctx"]
    statements = [
        f"var {rng.choice(names)}{i}=function({rng.choice(names)}){{return {i}*{rng.choice(names)}+1}};"
        for i in range(4 << 20 >> 5)
    ]
    (directory / "app.min.js.txt").write_text("".join(statements))


BOUND_ON_AND_OFF = """
import json, tempfile
from pathlib import Path
from tokenizers import pre_tokenizers
from tasks.bpe import BPEConfig, run_bpe
from tasks.ingest import IngestConfig, read_corpus, run_ingest
from tasks.shard import ShardConfig, run_shard

with tempfile.TemporaryDirectory() as workspace:
    corpus = run_ingest(IngestConfig(), workspace)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    longest = max(len(word) for batch in read_corpus(corpus.corpus) for text in batch.column("text").to_pylist()
                  for word, _ in byte_level.pre_tokenize_str(text))
    files = {}
    for bound in (BPEConfig().max_pretoken_bytes, None):
        tokenizer = run_bpe(BPEConfig(max_pretoken_bytes=bound), corpus, workspace)
        shards = run_shard(ShardConfig(), corpus, tokenizer, workspace)
        model = json.loads(tokenizer.tokenizer.read_text())["model"]
        files[bound] = (model, json.loads(shards.manifest.read_text())["files"])
    (on_model, on_files), (off_model, off_files) = files.values()
    print(json.dumps({"documents": corpus.report["documents_out"], "longest_pretoken": longest,
                      "bound": BPEConfig().max_pretoken_bytes, "same_merges": on_model == off_model,
                      "same_shards": on_files == off_files, "shard_files": len(on_files)}))
"""


def bound_on_and_off() -> None:
    """The default pipeline's corpus (the whole standard library) with the default bound and
    without: the tokenizer's merges and every shard file must be the same."""
    result = subprocess.run(
        [sys.executable, "-c", BOUND_ON_AND_OFF], cwd=REPO, capture_output=True, text=True, check=True
    )
    figures = json.loads(result.stdout.splitlines()[-1])
    print(
        f"\nstandard library ({figures['documents']} documents): longest pre-token {figures['longest_pretoken']} "
        f"bytes, bound {figures['bound']}; with and without the bound: same merges {figures['same_merges']}, "
        f"same {figures['shard_files']} shard files {figures['same_shards']}"
    )


def stages(source: Path, filters: str) -> dict:
    with tempfile.TemporaryDirectory() as workspace:
        result = subprocess.run(
            [sys.executable, "-c", STAGES_IN_A_FRESH_PROCESS, str(source), workspace, filters],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(result.stdout.splitlines()[-1])


QuickOpt = Annotated[bool, typer.Option(help="A slice of the standard library and a 6 MiB line.")]


def compare(quick: QuickOpt = False) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("[a-c]*.py" if quick else "*.py"))
    with tempfile.TemporaryDirectory() as scratch:
        corpora = {name: Path(scratch) / name for name in ("clean", "+line", "+line+blobs")}
        for directory in corpora.values():
            directory.mkdir()
            for path in files:
                shutil.copy(path, directory)
        for name in ("+line", "+line+blobs"):
            write_one_char_line(corpora[name], 6 if quick else 60)
        write_blobs(corpora["+line+blobs"])
        clean_mb = sum(path.stat().st_size for path in files) / 1e6
        print(
            f"clean: {len(files)} standard-library files, {clean_mb:.1f} MB; +line: and one line of one "
            f"character, {6 if quick else 60} MiB; +line+blobs: and a base64 blob and minified JavaScript, 4 MB each"
        )
        for filters, names in (("on", ["clean", "+line+blobs"]), ("off", ["clean", "+line", "+line+blobs"])):
            figures = {name: stages(corpora[name], filters) for name in names}
            kept = ", ".join(f"{name} {figures[name]['documents']}" for name in names)
            print(f"\ningest filters {filters} (documents kept: {kept})")
            for stage in ("ingest", "bpe", "shard", "all"):
                row = f"  {stage:<7}"
                for name in names:
                    if stage == "all":
                        seconds = sum(figures[name][s]["seconds"] for s in ("ingest", "bpe", "shard"))
                        row += f" {name:>11} {seconds:6.1f} s           "
                    else:
                        seconds, peak = figures[name][stage]["seconds"], figures[name][stage]["peak"]
                        row += f" {name:>11} {seconds:6.1f} s {peak / 2**20:5.0f} MiB"
                    if name != "clean":
                        parts = ["ingest", "bpe", "shard"] if stage == "all" else [stage]
                        clean = sum(figures["clean"][part]["seconds"] for part in parts)
                        row += f" ({seconds / clean:.2f}x)"
                print(row)
        print("\ntarget: the hostile corpus at most 2x the time of the clean one")
    if not quick:
        bound_on_and_off()


if __name__ == "__main__":
    typer.run(compare)
