"""Benchmark: the three data stages on a corpus 50 times the standard library, built offline.

    .venv/bin/python bench/scale.py                  # 320 MB (run it on a quiet machine: minutes)
    .venv/bin/python bench/scale.py --megabytes 2    # a smoke check (tests/integration/test_bench_scale.py)

The corpus is made, without a network, of what this machine has installed:

- code: the `.py` files (under 2 MB each) of the installed packages (site-packages and the
  standard library), in path order, until the corpus reaches its size;
- prose: the licence, readme and documentation texts those packages and Debian's packages
  ship (LICENSE*, COPYING*, *.txt, *.md, *.rst, /usr/share/doc), deduplicated by content;
  there is little of it (tens of MB), and the figure is printed: all of it is used, up to
  an eighth of the corpus.

Then, each stage in a fresh process (its peak RSS is VmHWM) on a fresh workspace: ingest, bpe,
shard, with per stage seconds, MB/s, tokens/s and peak RSS; the rerun of all three (every
stage reused); and the limits measured on the same bytes in the same run: read + sha256 of every
file, `tokenizers`' BPE trainer alone on the same sample of the train split, `encode_batch_fast`
alone on the corpus, the corpus's Parquet write alone. BPE trains on a sample of
`--bpe-sample-megabytes` (bpe.max_train_bytes): the same size at both sizes, so its memory is
set by the configuration, not by the corpus; what the sample costs is printed as bytes per
token on val against a tokenizer trained on the whole train split. All of it again at a
quarter of the corpus (the first files of each part, up to a quarter of its bytes), the
growth of time and memory printed as ratios (full / quarter), then issue 25's targets, met or
not. Last, each filter preset's drop rate per rule on the code part and on the prose part.

The rerun's seconds are mostly the three fresh processes' imports (Prefect), not the reuse.

The targets (issue 25): ingest at 16 MB/s or more on a 2-core machine, BPE within 1.3x of the
trainer alone, shards within 1.2x of encode_batch alone, every stage's peak RSS at full size
within 1.2x of that at a quarter.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pyarrow.parquet as pq
import typer
from tokenizers import Tokenizer, pre_tokenizers, trainers

from model.special_tokens import SPECIAL_TOKENS
from tasks.bpe import BPEConfig, check_on_val, load_tokenizer, new_tokenizer
from tasks.bpe_sample import train_batches
from tasks.ingest import IngestConfig, read_corpus
from tasks.ingest_filters import DocumentFilter, FilterConfig
from tasks.shard import ShardConfig

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
MAX_FILE_BYTES = 2 * MB
PROSE_SHARE = 1 / 8  # at most this share of the corpus is prose (there is little of it)
PROSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "README", "NOTICE", "AUTHORS", "copyright")
PROSE_SUFFIXES = (".txt", ".md", ".rst")
PRESETS = ("code", "web")

# One stage in a fresh process: its seconds, its peak RSS (VmHWM, not ru_maxrss: a child's
# ru_maxrss starts at its parent's peak; with ingest workers, the larger of this process's
# and the largest worker's) and its output. Ingest chunks run on `ingest_workers` processes
# (a process pool, as Prefect's ProcessPoolTaskRunner runs them) when it is above 1.
RUN_STAGE = """
import json, resource, sys, time
from concurrent.futures import ProcessPoolExecutor
from tasks.bpe import BPEConfig, BPEOutput, run_bpe
from tasks.ingest import IngestConfig, IngestOutput, ingest_chunk, run_in_order, run_ingest
from tasks.shard import ShardConfig, run_shard

stage, settings, workspace = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
workers = settings.get("ingest_workers", 1)


def on_processes(chunks):
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(ingest_chunk, chunks))


start = time.perf_counter()
if stage == "ingest":
    map_chunks = on_processes if workers > 1 else run_in_order
    output = run_ingest(IngestConfig.model_validate(settings["ingest"]), workspace, map_chunks)
else:
    corpus = IngestOutput.model_validate(settings["corpus"])
    if stage == "bpe":
        output = run_bpe(BPEConfig.model_validate(settings["bpe"]), corpus, workspace)
    else:
        tokenizer = BPEOutput.model_validate(settings["tokenizer"])
        output = run_shard(ShardConfig.model_validate(settings["shard"]), corpus, tokenizer, workspace)
seconds = time.perf_counter() - start
with open("/proc/self/status") as lines:
    peak = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))
peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
print(json.dumps({"seconds": seconds, "peak": peak, "output": output.model_dump(mode="json")}))
"""


# -- the corpus ---------------------------------------------------------------------------------


def installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    return sorted({Path(paths[name]) for name in ("purelib", "platlib", "stdlib")})


def code_files() -> Iterator[Path]:
    for root in installed_roots():
        for path in sorted(root.rglob("*.py")):
            if path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
                yield path


def prose_files() -> Iterator[Path]:
    for root in [*installed_roots(), Path("/usr/share/doc")]:
        for path in sorted(root.rglob("*")):
            named = path.name.startswith(PROSE_NAMES) or path.suffix in PROSE_SUFFIXES
            if named and path.is_file() and path.stat().st_size <= MAX_FILE_BYTES:
                yield path


def copy_part(files: Iterator[Path], directory: Path, budget: int) -> tuple[int, int]:
    """Copy distinct files (by content) into `directory` as NNNNNN.txt until `budget` bytes;
    (files, bytes) copied."""
    directory.mkdir(parents=True)
    seen: set[bytes] = set()
    copied = total = 0
    for path in files:
        data = path.read_bytes()
        digest = hashlib.sha256(data).digest()
        if digest in seen or total + len(data) > budget:
            continue
        seen.add(digest)
        (directory / f"{copied:06d}.txt").write_bytes(data)
        copied, total = copied + 1, total + len(data)
        if total >= budget * 0.999:
            break
    return copied, total


def build_corpus(directory: Path, size: int) -> dict[str, tuple[int, int]]:
    """`directory`/prose and `directory`/code, `size` bytes together; (files, bytes) of each."""
    prose = copy_part(prose_files(), directory / "prose", int(size * PROSE_SHARE))
    code = copy_part(code_files(), directory / "code", size - prose[1])
    return {"prose": prose, "code": code}


def quarter_of(corpus: Path, directory: Path) -> Path:
    """Each part's first files, in order, up to a quarter of its bytes, linked into `directory`:
    a quarter by bytes, so that the growth full / quarter is that of four times the bytes."""
    for part in ("prose", "code"):
        files = sorted((corpus / part).iterdir())
        budget = sum(path.stat().st_size for path in files) / 4
        (directory / part).mkdir(parents=True)
        taken = 0
        for path in files:
            if taken and taken + path.stat().st_size > budget:
                break
            (directory / part / path.name).hardlink_to(path)
            taken += path.stat().st_size
    return directory


# -- the stages and their limits ----------------------------------------------------------------


def run_stage(stage: str, settings: dict[str, Any], workspace: Path) -> dict[str, Any]:
    command = [sys.executable, "-c", RUN_STAGE, stage, json.dumps(settings), str(workspace)]
    printed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return json.loads(printed.splitlines()[-1])


def run_stages(source: Path, workspace: Path, bpe: BPEConfig, ingest_workers: int) -> dict[str, dict[str, Any]]:
    settings: dict[str, Any] = {
        "ingest_workers": ingest_workers,
        "ingest": IngestConfig(source=str(source)).model_dump(mode="json"),
        "bpe": bpe.model_dump(mode="json"),
        "shard": ShardConfig().model_dump(mode="json"),
    }
    runs = {"ingest": run_stage("ingest", settings, workspace)}
    settings["corpus"] = runs["ingest"]["output"]
    runs["bpe"] = run_stage("bpe", settings, workspace)
    settings["tokenizer"] = runs["bpe"]["output"]
    runs["shard"] = run_stage("shard", settings, workspace)
    start = time.perf_counter()
    for stage in ("ingest", "bpe", "shard"):
        assert run_stage(stage, settings, workspace)["output"]["reused"], f"{stage} was not reused"
    runs["rerun"] = {"seconds": time.perf_counter() - start}
    return runs


def timed(work: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def trained_alone(bpe: BPEConfig, corpus: dict[str, Any], max_train_bytes: int | None) -> Tokenizer:
    """`tokenizers`' BPE trainer alone, in this process, on the train split of `corpus` (the
    ingest stage's output): its sample of at most `max_train_bytes` as the bpe stage draws it
    (None: the whole split)."""
    trainer = trainers.BpeTrainer(
        vocab_size=bpe.vocab_size,
        min_frequency=bpe.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    batches = train_batches(Path(corpus["corpus"]), max_train_bytes, corpus["report"]["bytes_train"])
    tokenizer = new_tokenizer(bpe.max_pretoken_bytes)
    tokenizer.train_from_iterator(batches, trainer)
    return tokenizer


def limits(source: Path, runs: dict[str, dict[str, Any]], bpe: BPEConfig, scratch: Path) -> dict[str, float]:
    """Seconds of each limit on the same bytes as the stages (the trainer on the same sample)."""

    corpus, tokenizer = Path(runs["ingest"]["output"]["corpus"]), Path(runs["bpe"]["output"]["tokenizer"])

    def read_and_hash() -> None:
        for path in sorted(source.rglob("*.txt")):
            hashlib.sha256(path.read_bytes()).hexdigest()

    def trainer_alone() -> None:
        trained_alone(bpe, runs["ingest"]["output"], bpe.max_train_bytes)

    def encode_alone() -> None:
        loaded = load_tokenizer(tokenizer)
        for batch in read_corpus(corpus):
            loaded.encode_batch_fast(batch.column("text").to_pylist())

    def parquet_write_alone() -> None:
        pq.write_table(pq.read_table(corpus), scratch / "corpus-again.parquet", compression="zstd")

    work = {"read+sha256": read_and_hash, "bpe trainer": trainer_alone, "encode_batch": encode_alone}
    return {name: timed(step)[0] for name, step in (work | {"parquet write": parquet_write_alone}).items()}


def drop_rates(directory: Path) -> dict[str, dict[str, float]]:
    """Each preset's share of the documents of `directory` that each rule drops."""
    texts = [path.read_text(errors="replace") for path in sorted(directory.iterdir())]
    rates = {}
    for preset in PRESETS:
        quality = DocumentFilter(FilterConfig(preset=preset, near_dedup=False))
        for index, text in enumerate(texts):
            quality.keep(str(index), text)
        rates[preset] = {name: count / max(len(texts), 1) for name, count in sorted(quality.counts.dropped.items())}
    return rates


# -- the table ----------------------------------------------------------------------------------


def sample_rows(runs: dict[str, dict[str, Any]], bpe: BPEConfig) -> list[str]:
    """What the bpe stage's sample costs in compression: its tokenizer's bytes per token on
    val against a tokenizer trained (here, by the trainer alone) on the whole train split."""
    corpus, report = runs["ingest"]["output"], runs["bpe"]["output"]["report"]
    sample_bytes = report.get("train_sample_bytes", corpus["report"]["bytes_train"])
    seconds, whole = timed(lambda: trained_alone(bpe, corpus, None))
    whole_report = check_on_val(whole, Path(corpus["corpus"]))
    return [
        f"  bpe sample (bpe.max_train_bytes {bpe.max_train_bytes / MB:g} MB): {sample_bytes / MB:.1f} MB "
        f"of the train split's {corpus['report']['bytes_train'] / MB:.1f} MB",
        f"    val bytes/token: sample {report['val_bytes_per_token']:.4f}, "
        f"whole split {whole_report['val_bytes_per_token']:.4f} (trained alone in {seconds:.1f} s)",
    ]


def target_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Issue 25's targets at full size: each figure, its target, and whether it is met."""
    full, quarter = results["full"], results["quarter"]
    figures = [
        ("ingest MB/s", full["ingest"]["megabytes"] / full["ingest"]["seconds"], ">=", 16.0),
        ("bpe / trainer alone", full["bpe"]["seconds"] / full["bpe trainer"]["seconds"], "<=", 1.3),
        ("shard / encode_batch", full["shard"]["seconds"] / full["encode_batch"]["seconds"], "<=", 1.2),
    ] + [
        (f"{stage} peak RSS full/quarter", full[stage]["peak"] / quarter[stage]["peak"], "<=", 1.2)
        for stage in ("ingest", "bpe", "shard")
    ]
    rows = ["\ntargets at full size (issue 25):"]
    for name, value, sense, target in figures:
        met = value >= target if sense == ">=" else value <= target
        rows.append(f"  {name:28s} {value:7.2f}  target {sense} {target:<5g} {'met' if met else 'NOT met'}")
    return rows


def stage_rows(runs: dict[str, dict[str, Any]], corpus_bytes: int) -> list[str]:
    report = runs["shard"]["output"]["report"]
    tokens = report["train_stream_tokens"] + report["val_stream_tokens"]
    rows = []
    for stage in ("ingest", "bpe", "shard"):
        seconds, peak = runs[stage]["seconds"], runs[stage]["peak"]
        rows.append(
            f"  {stage:8s} {seconds:8.1f} s {corpus_bytes / MB / seconds:8.2f} MB/s "
            f"{tokens / seconds:12,.0f} tokens/s {peak / 2**20:8.0f} MiB peak"
        )
    rows.append(f"  rerun    {runs['rerun']['seconds']:8.1f} s (all three reused)")
    return rows


def main(
    megabytes: Annotated[float, typer.Option(help="The corpus's size; the quarter run uses a quarter.")] = 320,
    vocab_size: Annotated[int, typer.Option(help="bpe.vocab_size of the runs.")] = 8192,
    bpe_sample_megabytes: Annotated[
        float, typer.Option(help="bpe.max_train_bytes of the runs, in MB: the same sample size at both sizes.")
    ] = 32,
    ingest_workers: Annotated[int, typer.Option(help="Processes the ingest chunks run on.")] = 1,
) -> None:
    bpe = BPEConfig(vocab_size=vocab_size, max_train_bytes=int(bpe_sample_megabytes * MB))
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        parts = build_corpus(scratch / "full", int(megabytes * MB))
        quarter = quarter_of(scratch / "full", scratch / "quarter")
        print(f"corpus {megabytes:g} MB, built {time.strftime('%Y-%m-%d %H:%M')} UTC on this machine:")
        for part, (files, size) in parts.items():
            print(f"  {part:5s} {files:8,} files {size / MB:10.1f} MB (distinct by content)")
        results = {}
        for label, source in (("full", scratch / "full"), ("quarter", quarter)):
            corpus_bytes = sum(path.stat().st_size for path in source.rglob("*.txt"))
            runs = run_stages(source, scratch / f"ws-{label}", bpe, ingest_workers)
            runs["ingest"]["megabytes"] = corpus_bytes / MB
            results[label] = runs
            print(f"\n{label}: {corpus_bytes / MB:.1f} MB, each stage in a fresh process on a fresh workspace")
            print("\n".join(stage_rows(runs, corpus_bytes)))
            print("  limits on the same bytes, in this process:")
            for name, seconds in limits(source, runs, bpe, scratch).items():
                print(f"    {name:14s} {seconds:8.1f} s {corpus_bytes / MB / seconds:8.2f} MB/s")
                runs[name] = {"seconds": seconds}
            print("\n".join(sample_rows(runs, bpe)))
        print("\ngrowth, full / quarter:")
        for stage in ("ingest", "bpe", "shard"):
            full, part = results["full"][stage], results["quarter"][stage]
            time_ratio, peak_ratio = full["seconds"] / part["seconds"], full["peak"] / part["peak"]
            print(f"  {stage:8s} time {time_ratio:5.2f}x  peak RSS {peak_ratio:5.2f}x")
        print("\n".join(target_rows(results)))
        print("\ndrop rate per rule (near-dedup off), by preset:")
        for part in ("code", "prose"):
            for preset, rates in drop_rates(scratch / "full" / part).items():
                shown = ", ".join(f"{name} {rate:.1%}" for name, rate in rates.items()) or "none"
                print(f"  {part:5s} {preset:4s} {sum(rates.values()):6.1%} dropped: {shown}")


if __name__ == "__main__":
    typer.run(main)
