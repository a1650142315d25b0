"""Benchmark: corpus -> shards, ours against the way Hugging Face's `run_clm.py` does it.

    .venv/bin/python bench/prepare.py              # the figures (run on a quiet machine)
    .venv/bin/python bench/prepare.py --quick      # a smoke check on a slice of the corpus
    .venv/bin/python bench/prepare.py --hostile    # the data stages on a hostile corpus (bench/hostile.py)

The corpus and tokenizer come from the config's workspace (built, or reused if
`gptflow prepare` made them). Then, each run once untimed and then timed `--runs` times,
each timed run in a fresh process, the ways taking turns (median and range):

- encode_batch_fast alone: the corpus's documents through a freshly loaded tokenizer in the
  shard stage's batches and nothing else, the floor for any way of making shards;
- ours: the whole shard stage (`run_shard`) into a fresh workspace, the corpus as one
  chunk (the default chunk size holds the standard library);
- ours in chunks: the same with `--chunk-documents` documents per chunk, run one after the
  other: the overhead of cutting the work into chunks (part files, one more pass);
- the run_clm way: `datasets.load_dataset("parquet")`, `.map` tokenize with a
  `PreTrainedTokenizerFast`, `.map` group_texts, `.to_parquet`; adapted only as far as
  making the same windows (each document followed by <|endoftext|>, windows of
  seq_len + 1 sharing one token, grouped over a whole split rather than per 1000-row
  batch) so a hash over all window contents can show that both made the same ones.

Then the peak memory (RSS) of the shard stage in a fresh process on the corpus and on a
4x larger corpus of distinct documents: it should not grow with the corpus.

Targets (issue 2): ours >= 1.8x the run_clm way; the shard stage within 1.3x of
encode_batch_fast alone; peak memory flat from 1x to 4x. Issue 7: the same bytes in
chunks, at little extra cost.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from flows.pipeline_config import load_config
from model.data import SPLITS
from model.special_tokens import special_ids
from tasks.bpe import BPEOutput, load_tokenizer, run_bpe
from tasks.ingest import IngestOutput, run_ingest
from tasks.shard import ShardConfig, document_batches, run_shard

REPO = Path(__file__).resolve().parents[1]
# A slice of the standard library (~1 MB) for --quick.
QUICK = ["ingest.source=" + str(Path(sysconfig.get_paths()["stdlib"]) / "[a-c]*.py"), "bpe.vocab_size=2048"]

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak.
PEAK_RSS_OF_SHARD = """
import json, sys, tempfile
from pathlib import Path
from tasks.bpe import BPEOutput
from tasks.ingest import IngestOutput
from tasks.shard import ShardConfig, run_shard

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

corpus, tokenizer = IngestOutput.model_validate_json(sys.argv[1]), BPEOutput.model_validate_json(sys.argv[2])
before = status("VmRSS")
with tempfile.TemporaryDirectory() as workspace:
    run_shard(ShardConfig.model_validate_json(sys.argv[3]), corpus, tokenizer, Path(workspace))
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


# One timed run of a way in a fresh process: a process gets slower at this work as it ages
# (glibc raises its mmap threshold as large buffers are freed; later large buffers come from
# a fragmented heap and grow by copying), so runs in one process favour whichever runs first.
TIMED_RUN = """
import sys, time
sys.path.insert(0, "bench")
from prepare import prepared_run

work = prepared_run(*sys.argv[1:])
started = time.perf_counter()
work()
print(time.perf_counter() - started)
"""


def prepared_run(way: str, corpus: str, tokenizer: str, shard: str, out: str) -> Callable[[], object]:
    """One run of `way` ("encode", "ours" or "run_clm") from the JSON of its inputs, with
    what is not the way's work (imports, reading the documents to encode) done."""
    corpus_output = IngestOutput.model_validate_json(corpus)
    bpe, config = BPEOutput.model_validate_json(tokenizer), ShardConfig.model_validate_json(shard)
    if way == "encode":
        # Reading the corpus is not tokenizing.
        batches = [
            texts for _, texts in document_batches(corpus_output.corpus, 0, corpus_output.report["documents_out"])
        ]
        return lambda: encode_alone(bpe.tokenizer, batches)
    if way == "run_clm":
        import datasets  # noqa: F401
        import transformers  # noqa: F401

        return lambda: run_clm_way(corpus_output, bpe, config.seq_len, Path(out))
    return lambda: ours(corpus_output, bpe, config, Path(out))


def timed_in_fresh_process(
    way: str, corpus: IngestOutput, tokenizer: BPEOutput, shard: ShardConfig, out: Path
) -> float:
    command = [
        sys.executable,
        "-c",
        TIMED_RUN,
        way,
        corpus.model_dump_json(),
        tokenizer.model_dump_json(),
        shard.model_dump_json(),
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return float(result.stdout.splitlines()[-1])


def interleaved(ways: dict[str, Callable[[], float]], runs: int) -> dict[str, list[float]]:
    """`runs` timings of each way, the ways taking turns (in an order rotated each round) so
    that the machine's drifting load does not favour one."""
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            seconds[name].append(ways[name]())
    return seconds


def summary(seconds: list[float], tokens: int) -> str:
    rates = sorted(tokens / s / 1e6 for s in seconds)
    return (
        f"{statistics.median(seconds):7.2f} s  {statistics.median(rates):5.2f} M tokens/s"
        f"  (range {rates[0]:.2f}-{rates[-1]:.2f}, n={len(seconds)})"
    )


# -- the three ways -------------------------------------------------------------------


def encode_alone(tokenizer: Path, batches: list[list[str]]) -> int:
    """encode_batch_fast over every document, in the shard stage's batches, with the
    tokenizer loaded afresh as the stage loads it (a used one has a warm word cache): tokens."""
    bpe = load_tokenizer(tokenizer)
    return sum(len(encoding.ids) for batch in batches for encoding in bpe.encode_batch_fast(batch))


def ours(corpus: IngestOutput, tokenizer: BPEOutput, shard: ShardConfig, workspace: Path) -> Path:
    return run_shard(shard, corpus, tokenizer, workspace).manifest


def run_clm_way(corpus: IngestOutput, tokenizer: BPEOutput, seq_len: int, out: Path) -> dict[str, Path]:
    """datasets + transformers as run_clm.py uses them, making the shard stage's windows."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    backend = load_tokenizer(tokenizer.tokenizer)
    eos = special_ids(backend).eos
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    raw = datasets.load_dataset("parquet", data_files=str(corpus.corpus), split="train", cache_dir=str(out / "cache"))

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in hf_tokenizer(batch["text"])["input_ids"]]}

    def group_texts(batch):
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        count = (len(stream) - 1) // seq_len
        return {"tokens": [stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]}

    files = {}
    for split in SPLITS:
        part = raw.filter(lambda s: s == split, input_columns="split", load_from_cache_file=False)
        tokenized = part.map(tokenize, batched=True, remove_columns=part.column_names, load_from_cache_file=False)
        windows = tokenized.map(
            group_texts, batched=True, batch_size=None, remove_columns=["input_ids"], load_from_cache_file=False
        )
        files[split] = out / f"{split}.parquet"
        windows.to_parquet(str(files[split]))
    return files


# -- checks ---------------------------------------------------------------------------


def windows_digest(tables: dict[str, list[pa.Table]]) -> str:
    """sha256 over every window's token ids (as uint32), split by split, in order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        column = pa.concat_tables(tables[split]).column("tokens").combine_chunks()
        values = column.flatten().to_numpy().astype(np.uint32)
        digest.update(f"{split}:{len(column)}:{len(values)}".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()


def our_windows(manifest: Path) -> dict[str, list[pa.Table]]:
    files = json.loads(manifest.read_text())["files"]
    return {
        split: [pq.read_table(manifest.parent / f["path"]) for f in files if f["split"] == split] for split in SPLITS
    }


def four_times_larger(corpus: IngestOutput, directory: Path) -> IngestOutput:
    """The corpus four times over, each copy's documents made distinct by a first line,
    in row groups like the corpus's."""
    path = directory / "corpus-4x.parquet"
    source = pq.ParquetFile(corpus.corpus)
    with pq.ParquetWriter(path, source.schema_arrow, compression="zstd") as writer:
        for copy in range(4):
            for group in range(source.num_row_groups):
                rows = source.read_row_group(group).to_pydict()
                rows["id"] = [f"copy{copy}/{doc_id}" for doc_id in rows["id"]]
                rows["text"] = [f"# copy {copy}\n{text}" for text in rows["text"]]
                writer.write_table(pa.table(rows, schema=source.schema_arrow))
    report = {
        f"{count}_{split}": 4 * corpus.report[f"{count}_{split}"]
        for count in ("documents", "bytes")
        for split in SPLITS
    }
    return IngestOutput(path=directory, corpus=path, fingerprint=f"{corpus.fingerprint}-4x", report=report)


def peak_rss(corpus: IngestOutput, tokenizer: BPEOutput, shard: ShardConfig) -> dict[str, int]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PEAK_RSS_OF_SHARD,
            corpus.model_dump_json(),
            tokenizer.model_dump_json(),
            shard.model_dump_json(),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.splitlines()[-1])


def main(
    config: Annotated[Path, typer.Option(help="The pipeline config whose corpus and tokenizer to use.")] = REPO
    / "configs/tiny.yaml",
    runs: Annotated[int, typer.Option(help="Timed runs of each way (median and range).")] = 5,
    quick: Annotated[bool, typer.Option(help="One run on a slice of the corpus: only checks that it runs.")] = False,
    chunk_documents: Annotated[int, typer.Option(help="Documents per chunk for the chunked run.")] = 200,
    hostile: Annotated[bool, typer.Option(help="Instead: each data stage on a hostile corpus vs a clean one.")] = False,
) -> None:
    if hostile:
        from hostile import compare  # bench/ is on the path of a script run from it

        compare(quick)
        return
    settings = load_config(config, QUICK if quick else [])
    runs = 1 if quick else runs
    corpus = run_ingest(settings.ingest, settings.workspace)
    tokenizer = run_bpe(settings.bpe, corpus, settings.workspace)
    shard = settings.shard
    print(
        f"corpus {settings.ingest.source}: {corpus.report['documents_out']} documents, "
        f"{corpus.report['bytes_train'] + corpus.report['bytes_val']:,} bytes; vocab {tokenizer.report['vocab_size']}, "
        f"seq_len {shard.seq_len}, stride {shard.stride}"
    )

    batches = [texts for _, texts in document_batches(corpus.corpus, 0, corpus.report["documents_out"])]
    chunked = shard.model_copy(update={"chunk_documents": chunk_documents})

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # One untimed run of each way first (file caches): the outputs checked below.
        tokens = encode_alone(tokenizer.tokenizer, batches)
        manifest = ours(corpus, tokenizer, shard, scratch / "ours-check")
        chunked_manifest = ours(corpus, tokenizer, chunked, scratch / "chunked-check")
        clm_files = run_clm_way(corpus, tokenizer, shard.seq_len, scratch / "run_clm-check")
        same_in_chunks = all(
            (manifest.parent / name).read_bytes() == (chunked_manifest.parent / name).read_bytes()
            for name in [manifest.name, *(entry["path"] for entry in json.loads(manifest.read_text())["files"])]
        )
        outputs = (scratch / f"run-{i}" for i in itertools.count())

        def run(way: str, config: ShardConfig) -> Callable[[], float]:
            return lambda: timed_in_fresh_process(way, corpus, tokenizer, config, next(outputs))

        seconds = interleaved(
            {
                "encode": run("encode", shard),
                "ours": run("ours", shard),
                "chunked": run("ours", chunked),
                "run_clm": run("run_clm", shard),
            },
            runs,
        )
        encode_seconds, ours_seconds, chunked_seconds, clm_seconds = seconds.values()
        ours_digest = windows_digest(our_windows(manifest))
        clm_digest = windows_digest({split: [pq.read_table(clm_files[split])] for split in SPLITS})
        peak_1x = peak_rss(corpus, tokenizer, shard)
        peak_4x = peak_rss(four_times_larger(corpus, scratch), tokenizer, shard)

    print(f"\ncorpus -> shards, {tokens:,} document tokens (medians of {runs} runs):")
    print(f"  encode_batch_fast alone   {summary(encode_seconds, tokens)}")
    print(f"  shard stage (ours)        {summary(ours_seconds, tokens)}")
    chunks = -(-corpus.report["documents_out"] // chunk_documents)
    print(f"  ours in {chunks:3d} chunks        {summary(chunked_seconds, tokens)}")
    print(f"  run_clm way               {summary(clm_seconds, tokens)}")
    ratio_clm = statistics.median(clm_seconds) / statistics.median(ours_seconds)
    ratio_encode = statistics.median(ours_seconds) / statistics.median(encode_seconds)
    print(f"\nours vs run_clm way: {ratio_clm:.2f}x faster (target >= 1.8x)")
    print(f"shard stage / encode_batch_fast alone: {ratio_encode:.2f}x the time (target <= 1.3x)")
    ratio_chunks = statistics.median(chunked_seconds) / statistics.median(ours_seconds)
    print(f"in {chunks} chunks / in one: {ratio_chunks:.2f}x the time; same bytes: {'yes' if same_in_chunks else 'NO'}")
    same = "yes" if ours_digest == clm_digest else "NO"
    print(f"same windows: {same} (sha256 {ours_digest[:16]} vs {clm_digest[:16]})")
    print("\npeak memory (RSS) of the shard stage, fresh process:")
    for name, peak in (("1x corpus", peak_1x), ("4x corpus", peak_4x)):
        print(
            f"  {name}: peak {peak['peak'] / 2**20:6.0f} MiB, "
            f"{(peak['peak'] - peak['before']) / 2**20:5.0f} MiB above the process before the stage"
        )
    if ours_digest != clm_digest:
        raise SystemExit("the two ways made different windows")
    if not same_in_chunks:
        raise SystemExit("the shards made in chunks differ from those made in one")


if __name__ == "__main__":
    typer.run(main)
