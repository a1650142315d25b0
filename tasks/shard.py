"""Stage 3, shard: corpus + tokenizer -> fixed-length training windows in Parquet files.

The token stream of a split is every document of that split, in corpus order, each
followed by `<|endoftext|>` (id 0). Window `i` of the stream is the `seq_len + 1` tokens
starting at stream position `i * stride`: inputs are `window[:-1]`, next-token targets
`window[1:]`. With `stride == seq_len` consecutive windows share one token (the last
target of window `i` is the first input of window `i + 1`), so every stream token after
the first is a target exactly once; with `stride < seq_len` windows overlap as in GPT-3's
training examples. Tokens after the end of the last window are dropped and counted.

The work is split in two steps so it can run on many workers (Prefect task runs on
threads or a Dask cluster, see flows/prepare.py; plain calls in order without Prefect):
1. `encode_chunk`, once per chunk of `shard.chunk_documents` consecutive corpus documents:
   each split's documents of the chunk, encoded (in batches of `ENCODE_BATCH_CHARS`, two at
   a time, long documents in pieces cut where that does not change their tokens) and each
   followed by `<|endoftext|>`, appended as raw token ids to a part file
   `parts/<chunk>-<split>.tokens`;
2. `merge_parts`: per split, the parts read back in chunk order are exactly the split's
   stream, cut into windows and written as below; then the parts are deleted.
The stream does not depend on where it was cut, so the shards and the manifest are byte
for byte the same whatever the number of chunks or workers, and `chunk_documents` is not
part of the fingerprint. Memory is bounded by an encode batch and a row group in both steps.
A Ctrl-C or SIGTERM stops the stage between batches: chunks on threads check the stop flag
of tasks/core/stopping.py before each batch, so what still runs after a signal is the
`ENCODE_AHEAD` batches each running chunk has in flight (native code, not interruptible).

Output directory `<workspace>/shard/<fingerprint>/`:

    train-00000.parquet, train-00001.parquet, ..., val-00000.parquet, ..., manifest.json

Each Parquet file has exactly one column, `tokens`, of Arrow type
`fixed_size_list<uint16>[seq_len + 1]` (`uint32` when the vocabulary has more than 65,536
ids), one row per window, windows in stream order: a split's stream continues from the
last row of `<split>-0000k` to the first row of `<split>-0000(k+1)`. Compression is zstd.
Every row group holds exactly `row_group_rows` windows except the last group of a split,
so window `r` of a file is row `r % row_group_rows` of row group `r // row_group_rows`; a
row group is about 256 KiB uncompressed, cheap to read whole for random access
(`pyarrow.parquet.ParquetFile(path).read_row_group(g)`). Files are at most `shard_bytes`
bytes on disk, are written under a temporary name and renamed, and `manifest.json` is
written last (its presence means the directory is complete). `write_split` writes the
files of one split from any token stream (for tests that need shards of a known stream).

`manifest.json` (fields in this order; no timestamps or absolute paths, so two runs on
the same inputs write byte-identical manifests):

    format            int   layout version of this directory (FORMAT_VERSION)
    fingerprint       str   this directory's name
    inputs            {"corpus": ingest fingerprint, "tokenizer": bpe fingerprint}
    seq_len           int   a window is seq_len + 1 tokens
    stride            int   window i starts at stream token i * stride
    dtype             "uint16" | "uint32"   numpy/Arrow type of the token ids
    vocab_size        int   the tokenizer's vocabulary size (ids are < vocab_size)
    tokenizer_sha256  str   sha256 of the tokenizer.json the windows were encoded with
    eos_id            int   0, the `<|endoftext|>` id that ends every document
    compression       "zstd"
    row_group_rows    int   windows per row group (the last group of a file may be shorter)
    files             [{"path": "train-00000.parquet", "split": "train", "rows": int,
                        "tokens": rows * (seq_len + 1), "row_groups": int, "bytes": int,
                        "sha256": str}, ...]   in split order (train, val), then index order
    totals            {"train": {"rows", "tokens", "dropped_tokens", "documents",
                                 "stream_tokens"}, "val": {...}}
                      tokens = rows * (seq_len + 1); stream_tokens counts the whole
                      stream (documents + one <|endoftext|> each); dropped_tokens are the
                      stream tokens after the end of the last window
    report            the stage report (flat dict of the totals, also in the flow artifact)
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.lib.stride_tricks import sliding_window_view
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from model.data import SPLITS, ShardManifest
from model.errors import UserError
from model.special_tokens import special_ids
from tasks.bpe import BPEOutput, load_tokenizer
from tasks.core.progress import step_progress
from tasks.core.stage_state import ending_cached
from tasks.core.stopping import check_stop, stop_on_signals
from tasks.core.storage import filesystem
from tasks.core.workspace import MANIFEST, StageDir, StageOutput, atomic_path, fingerprint, sha256_file
from tasks.ingest import IngestOutput

FORMAT_VERSION = 1
COMPRESSION = "zstd"
ROW_GROUP_BYTES = 256 << 10  # uncompressed bytes of a row group: one random read
# Characters per encode_batch_fast call: enough documents for every core, while the
# Encoding objects (~100 bytes per token) stay small whatever the corpus size.
ENCODE_BATCH_CHARS = 1 << 20
# Batches being encoded at once (see `encoded`); each holds its token ids until written.
ENCODE_AHEAD = 2
# A longer document is encoded in pieces (see `pieces`): a document is encoded on one thread
# and takes ~100 bytes per character while it is, so the longest document, not the batch,
# would set the peak memory (the more documents, the longer the longest) and keep one core
# busy while the other waits.
PIECE_CHARS = 1 << 16
# Where a document may be cut into pieces: before a newline that follows a printable
# non-space ASCII character. In the GPT-2 pattern of the byte-level pre-tokenizer
# (tasks/bpe.py) no word runs from a non-space character into white space and none looks
# behind, so a word ends there whether the document goes on or not and the next starts
# there either way; BPE never merges across words, so the pieces' tokens one after the other
# are exactly the document's.
CUT = re.compile(r"(?<=[!-~])(?=\n)")
# Parquet's footer grows with the row groups it describes (measured: ~600 bytes + ~80
# per group); these bounds leave room to spare when deciding whether a group still fits.
FOOTER_BYTES = 2048
FOOTER_BYTES_PER_GROUP = 256
MIN_SHARD_BYTES = 4096


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = Field(256, ge=1, description="tokens of context; a window is seq_len + 1 tokens")
    stride: int | None = Field(None, ge=1, description="window i starts at token i * stride (default: seq_len)")
    shard_bytes: int = Field(128 << 20, ge=MIN_SHARD_BYTES, description="largest Parquet file on disk")
    chunk_documents: int = Field(
        50_000, ge=1, description="corpus documents per encoding task run (does not change the shards)"
    )

    @model_validator(mode="after")
    def _stride_within_window(self) -> ShardConfig:
        if self.stride is None:
            self.stride = self.seq_len
        if self.stride > self.seq_len:
            raise ValueError(
                f"stride ({self.stride}) must be at most seq_len ({self.seq_len}), or some tokens are never targets"
            )
        return self


class ShardOutput(StageOutput):
    manifest: Path  # manifest.json
    tokenizer: BPEOutput | None = None  # what the windows were encoded with (None: shards made elsewhere)


# -- the token stream and its windows -------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class StreamCounts(BaseModel):
    documents: int = 0
    stream_tokens: int = 0


def with_eos(documents: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    """The documents' token ids as one stream, each document followed by <|endoftext|> (`eos`)."""
    length = sum(map(len, documents)) + len(documents)
    tokens = itertools.chain.from_iterable(itertools.chain(doc, (eos,)) for doc in documents)
    return np.fromiter(tokens, dtype, length)


def document_batches(
    corpus: Path, start: int, stop: int, max_chars: int = ENCODE_BATCH_CHARS
) -> Iterator[tuple[str, list[str]]]:
    """Corpus documents `start` to `stop - 1` as `(split, texts)` batches of at most
    `max_chars` characters (or one longer document), each split's documents in corpus order."""
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    for group in corpus_slice(corpus, start, stop):
        for text, split in zip(group.column("text").to_pylist(), group.column("split").to_pylist()):
            # Cut before the document that would overflow the batch: a batch's encodings
            # are the stage's peak memory, so it must not reach max_chars + a long document
            # when one happens to come last (more likely the more documents there are).
            if texts[split] and chars[split] + len(text) > max_chars:
                yield split, texts[split]
                texts[split], chars[split] = [], 0
            texts[split].append(text)
            chars[split] += len(text)
    for split in SPLITS:
        if texts[split]:
            yield split, texts[split]


def pieces(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut at `CUT` into pieces of at most `max_chars` characters
    (longer where `CUT` finds no place within `max_chars`)."""
    if len(text) <= max_chars:
        return [text]
    cuts, start, previous = [], 0, 0
    for match in itertools.chain(CUT.finditer(text), [None]):
        end = match.end() if match else len(text)
        if end - start > max_chars and previous > start:
            cuts.append(previous)
            start = previous
        previous = end
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def encode_documents(bpe: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's token ids; long documents are encoded in pieces, in parallel."""
    cut = [pieces(text) for text in texts]
    encodings = iter(bpe.encode_batch_fast([piece for document in cut for piece in document]))
    return [list(itertools.chain.from_iterable(next(encodings).ids for _ in document)) for document in cut]


def stopping_between(batches: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, list[str]]]:
    """The batches, until a stop is asked for (tasks/core/stopping.py): then StopRequested, before the
    next batch goes to the encoder."""
    for batch in batches:
        check_stop()
        yield batch


def encoded(
    bpe: Tokenizer, batches: Iterable[tuple[str, list[str]]]
) -> Iterator[tuple[str, list[str], list[list[int]]]]:
    """`(split, texts, token ids of each text)` for each batch, in order, with the next batches
    already being encoded. encode_batch_fast releases the GIL and spreads one batch's
    documents over Rayon's threads: with more batches in flight, a thread done with its share
    of one batch (the other still on its last document) takes documents of the next, and the
    caller's Python work on a batch's tokens overlaps the encoding of the next."""
    with ThreadPoolExecutor(ENCODE_AHEAD) as pool:
        pending: deque[tuple[str, list[str], Future[list[list[int]]]]] = deque()
        for split, texts in batches:
            pending.append((split, texts, pool.submit(encode_documents, bpe, texts)))
            if len(pending) == ENCODE_AHEAD:
                split, texts, ids = pending.popleft()
                yield split, texts, ids.result()
        for split, texts, ids in pending:
            yield split, texts, ids.result()


def corpus_slice(corpus: Path, start: int, stop: int) -> Iterator[pa.Table]:
    """Rows `start` to `stop - 1` of the corpus, one row group (~1M characters) at a time."""
    file = pq.ParquetFile(corpus)
    first = 0
    for group in range(file.metadata.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if first < stop and first + rows > start:
            table = file.read_row_group(group, columns=["text", "split"])
            yield table.slice(max(start - first, 0), min(stop, first + rows) - max(start, first))
        first += rows


def window_count(stream_tokens: int, seq_len: int, stride: int) -> int:
    """How many windows of seq_len + 1 tokens, one every `stride` tokens, fit in a stream."""
    return 0 if stream_tokens < seq_len + 1 else (stream_tokens - seq_len - 1) // stride + 1


def window_groups(stream: Iterable[np.ndarray], seq_len: int, stride: int, group_rows: int) -> Iterator[np.ndarray]:
    """The stream's windows, `group_rows` at a time (the last group may have fewer), as
    arrays of shape (rows, seq_len + 1). Only the stream from the next window's start on is
    kept, so memory is bounded by a group plus one chunk of the stream."""
    pending: np.ndarray | None = None

    def cut(rows: int) -> np.ndarray:
        nonlocal pending
        span = (rows - 1) * stride + seq_len + 1
        windows = sliding_window_view(pending[:span], seq_len + 1)[::stride].copy()
        pending = pending[rows * stride :]
        return windows

    for chunk in stream:
        pending = chunk if pending is None else np.concatenate([pending, chunk])
        while window_count(len(pending), seq_len, stride) >= group_rows:
            yield cut(group_rows)
    if pending is not None and (rows := window_count(len(pending), seq_len, stride)):
        yield cut(rows)


# -- Parquet files ----------------------------------------------------------------------


def row_group_rows(seq_len: int, dtype: np.dtype, shard_bytes: int) -> int:
    """Windows per row group: ~ROW_GROUP_BYTES uncompressed, and many groups per file."""
    return max(1, min(ROW_GROUP_BYTES, shard_bytes // 8) // ((seq_len + 1) * dtype.itemsize))


def first_group_bound(rows: int, window: int, dtype: np.dtype) -> int:
    """Before any group is written: uncompressed size plus level and page overhead."""
    return rows * (window * dtype.itemsize + 8) + 1024


def write_shards(
    groups: Iterable[np.ndarray], directory: Path, split: str, dtype: np.dtype, shard_bytes: int
) -> list[dict[str, Any]]:
    """Write window groups (one row group each) to `<split>-00000.parquet`, ... of at most
    `shard_bytes` each; return their manifest entries.

    A group goes into the current file if the file's size, plus 1.5x the most a window has
    taken so far times the group's rows, plus the footer still fit.
    """
    groups = iter(groups)
    group = next(groups, None)
    bytes_per_row = 0.0
    files: list[dict[str, Any]] = []

    def fits(size: int, groups_in_file: int, rows: int) -> bool:
        footer = FOOTER_BYTES + FOOTER_BYTES_PER_GROUP * (groups_in_file + 1)
        return size + 1.5 * bytes_per_row * rows + footer <= shard_bytes

    while group is not None:
        path = directory / f"{split}-{len(files):05d}.parquet"
        window = group.shape[1]
        schema = pa.schema([("tokens", pa.list_(pa.from_numpy_dtype(dtype), window))])
        rows = groups_in_file = 0
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
            # Token ids hardly repeat within a page: dictionary encoding would cost time and
            # make sizes less predictable; zstd does the compressing.
            writer = pq.ParquetWriter(sink, schema, compression=COMPRESSION, use_dictionary=False)
            while group is not None and (groups_in_file == 0 or fits(sink.tell(), groups_in_file, len(group))):
                before = sink.tell()
                column = pa.FixedSizeListArray.from_arrays(pa.array(group.reshape(-1)), window)
                writer.write_table(pa.table([column], schema=schema), row_group_size=len(group))
                bytes_per_row = max(bytes_per_row, (sink.tell() - before) / len(group))
                rows, groups_in_file = rows + len(group), groups_in_file + 1
                group = next(groups, None)
            writer.close()
        files.append(
            {
                "path": path.name,
                "split": split,
                "rows": rows,
                "tokens": rows * window,
                "row_groups": groups_in_file,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    return files


def write_split(
    stream: Iterable[np.ndarray],
    directory: Path,
    split: str,
    seq_len: int,
    stride: int,
    dtype: np.dtype,
    shard_bytes: int,
) -> list[dict[str, Any]]:
    """Cut a split's token stream (chunks of token ids) into windows and write its shard
    files; return their manifest entries. The stage uses it, and so can tests that need
    shards of a known stream."""
    groups = window_groups(stream, seq_len, stride, row_group_rows(seq_len, dtype, shard_bytes))
    return write_shards(groups, directory, split, dtype, shard_bytes)


# -- chunks: encode in parallel, merge in order -------------------------------------------


class ShardChunk(BaseModel):
    """One `encode_chunk` call: corpus documents `start` to `stop - 1`."""

    index: int
    start: int
    stop: int
    corpus: IngestOutput
    tokenizer: BPEOutput
    workspace: Path | str  # where a worker on another machine finds the corpus and tokenizer
    parts: Path | str  # the directory (or s3:// URI) the part files go to
    dtype: str


class ChunkCounts(BaseModel):
    index: int
    splits: dict[str, StreamCounts]


def part_name(index: int, split: str) -> str:
    return f"{index:05d}-{split}.tokens"


def plan_chunks(
    config: ShardConfig,
    corpus: IngestOutput,
    tokenizer: BPEOutput,
    workspace: Path | str,
    parts: Path | str,
    dtype: np.dtype,
) -> list[ShardChunk]:
    documents = pq.ParquetFile(corpus.corpus).metadata.num_rows
    return [
        ShardChunk(
            index=index,
            start=start,
            stop=min(start + config.chunk_documents, documents),
            corpus=corpus,
            tokenizer=tokenizer,
            workspace=workspace,
            parts=parts,
            dtype=dtype.name,
        )
        for index, start in enumerate(range(0, documents, config.chunk_documents))
    ]


def encode_chunk(chunk: ShardChunk) -> ChunkCounts:
    """Encode a chunk's documents into one part file per split; count them."""
    corpus = chunk.corpus.local_file(chunk.corpus.corpus, chunk.workspace)
    bpe = load_tokenizer(chunk.tokenizer.local_file(chunk.tokenizer.tokenizer, chunk.workspace))
    dtype = np.dtype(chunk.dtype)
    eos = special_ids(bpe).eos
    counts = {split: StreamCounts() for split in SPLITS}
    fs, parts = filesystem(chunk.parts)
    with ExitStack() as files:
        sinks = {
            split: files.enter_context(fs.open_output_stream(f"{parts}/{part_name(chunk.index, split)}"))
            for split in SPLITS
        }
        batches = encoded(bpe, stopping_between(document_batches(corpus, chunk.start, chunk.stop)))
        progress = files.enter_context(step_progress(f"shard: chunk {chunk.index}", chunk.stop - chunk.start))
        for split, texts, ids in batches:
            progress.advance(len(texts), sum(len(text.encode()) for text in texts), sum(map(len, ids)))
            tokens = with_eos(ids, eos, dtype)
            sinks[split].write(tokens.tobytes())
            counts[split].documents += len(texts)
            counts[split].stream_tokens += len(tokens)
    return ChunkCounts(index=chunk.index, splits=counts)


def read_parts(
    parts: Path | str, names: list[str], dtype: np.dtype, block_tokens: int = 1 << 22
) -> Iterator[np.ndarray]:
    """The part files one after the other, as arrays of at most `block_tokens` token ids."""
    fs, root = filesystem(parts)
    for name in names:
        with fs.open_input_stream(f"{root}/{name}") as source:
            while block := source.read(block_tokens * dtype.itemsize):
                yield np.frombuffer(block, dtype)


def run_in_order(chunks: list[ShardChunk]) -> list[ChunkCounts]:
    """How chunks run without Prefect: one after the other, in this process."""
    return [encode_chunk(chunk) for chunk in chunks]


# -- the stage ------------------------------------------------------------------------


def split_totals(files: list[dict[str, Any]], counts: StreamCounts, config: ShardConfig) -> dict[str, int]:
    rows = sum(entry["rows"] for entry in files)
    # The windows cover the stream up to the end of the last one; the rest is dropped.
    covered = (rows - 1) * config.stride + config.seq_len + 1 if rows else 0
    return {
        "rows": rows,
        "tokens": rows * (config.seq_len + 1),
        "dropped_tokens": counts.stream_tokens - covered,
        "documents": counts.documents,
        "stream_tokens": counts.stream_tokens,
    }


def check_shard_bytes(config: ShardConfig, vocab_size: int) -> None:
    """A file must hold at least one window; known before anything is tokenized."""
    dtype = token_dtype(vocab_size)
    if first_group_bound(1, config.seq_len + 1, dtype) + FOOTER_BYTES + FOOTER_BYTES_PER_GROUP > config.shard_bytes:
        raise UserError(
            f"shard.shard_bytes={config.shard_bytes} is too small for one window of "
            f"shard.seq_len + 1 = {config.seq_len + 1} {dtype.name} tokens"
        )


def check_filled(split: str, counts: StreamCounts, config: ShardConfig) -> None:
    if window_count(counts.stream_tokens, config.seq_len, config.stride) == 0:
        more = "raise ingest.val_fraction" if split == "val" else "add documents"
        raise UserError(
            f"shard: the {split} split has {counts.stream_tokens} tokens, fewer than "
            f"shard.seq_len + 1 = {config.seq_len + 1}: lower shard.seq_len or {more}"
        )


def shard_fingerprint(config: ShardConfig, corpus_fingerprint: str, tokenizer_fingerprint: str) -> str:
    # How the work is cut into chunks does not change the shards.
    settings = config.model_dump(mode="json", exclude={"chunk_documents"})
    inputs = {"corpus": corpus_fingerprint, "tokenizer": tokenizer_fingerprint}
    return fingerprint("shard", settings, inputs, FORMAT_VERSION)


def run_shard(
    config: ShardConfig,
    corpus: IngestOutput,
    tokenizer: BPEOutput,
    workspace: Path | str,
    map_chunks: Callable[[list[ShardChunk]], list[ChunkCounts]] = run_in_order,
    parts_in_workspace: bool = False,
) -> ShardOutput:
    """Encode the corpus and write `<workspace>/shard/<fingerprint>/` (or reuse it).

    `map_chunks(chunks)` runs `encode_chunk` on each chunk (in order here; as Prefect
    task runs in the prepare flow) and returns their counts in chunk order. The part files go
    to the local build directory, or with `parts_in_workspace` to the workspace itself,
    for workers on other machines that share only an s3:// workspace.
    """
    inputs = {"corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint}
    stage = StageDir(workspace, "shard", shard_fingerprint(config, corpus.fingerprint, tokenizer.fingerprint))
    vocab_size = tokenizer.report["vocab_size"]
    dtype = token_dtype(vocab_size)
    check_shard_bytes(config, vocab_size)

    def build(directory: Path) -> dict[str, Any]:
        parts = f"{stage.location}/parts" if parts_in_workspace else directory / "parts"
        fs, parts_root = filesystem(parts)
        fs.create_dir(parts_root)
        chunks = plan_chunks(config, corpus, tokenizer, workspace, parts, dtype)
        with stop_on_signals():  # the chunks may encode on threads that signals do not reach
            results = map_chunks(chunks)
        counts = {split: StreamCounts() for split in SPLITS}
        for result in results:
            for split, part in result.splits.items():
                counts[split].documents += part.documents
                counts[split].stream_tokens += part.stream_tokens
        for split in reversed(SPLITS):  # val first: the split most likely too short
            check_filled(split, counts[split], config)
        files: dict[str, list[dict[str, Any]]] = {}
        for split in SPLITS:
            stream = read_parts(parts, [part_name(result.index, split) for result in results], dtype)
            files[split] = write_split(
                stream, directory, split, config.seq_len, config.stride, dtype, config.shard_bytes
            )
        fs.delete_dir(parts_root)
        totals = {split: split_totals(files[split], counts[split], config) for split in SPLITS}
        return ShardManifest(
            format=FORMAT_VERSION,
            fingerprint=stage.fingerprint,
            inputs=inputs,
            seq_len=config.seq_len,
            stride=config.stride,
            dtype=dtype.name,
            vocab_size=vocab_size,
            tokenizer_sha256=sha256_file(tokenizer.tokenizer),
            eos_id=special_ids(load_tokenizer(tokenizer.local_file(tokenizer.tokenizer, workspace))).eos,
            compression=COMPRESSION,
            row_group_rows=row_group_rows(config.seq_len, dtype, config.shard_bytes),
            files=[entry for split in SPLITS for entry in files[split]],
            totals=totals,
            report={
                f"{split}_{name}": value
                for split in SPLITS
                for name, value in [*totals[split].items(), ("files", len(files[split]))]
            },
        ).to_json()

    return ShardOutput.build_once(stage, build, manifest=MANIFEST).model_copy(update={"tokenizer": tokenizer})


# The stage's Prefect task is `run_shard` itself (ending `Cached` when reused); its `map_chunks`
# may run the chunks as task runs.
shard_task = task(name="shard", cache_policy=NO_CACHE)(ending_cached(run_shard))


@task(name="shard-chunk", cache_policy=NO_CACHE)
def encode_chunk_task(chunk: ShardChunk) -> ChunkCounts:
    """Prefect task over `encode_chunk`: one chunk of the shard stage."""
    return encode_chunk(chunk)
