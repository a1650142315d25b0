"""Stage 1, ingest: a text source -> one Parquet corpus of clean, deduplicated documents.

Sources (`ingest.source`):
- `python-stdlib` (the default): the `.py` files of the running Python's standard library,
  found with `sysconfig`, never `site-packages`/`dist-packages`, without `test/`, `tests/`
  and `idle_test/` unless `ingest.include_tests`.
- a local file, directory (recursive) or glob of `.txt`/`.md`/`.py` files (one document
  each), `.jsonl`/`.json` records and `.parquet` rows (the string in `ingest.text_field`).
- `hf:NAME`: a Hugging Face dataset through `datasets` (`ingest.hf_config`,
  `ingest.hf_split`, `ingest.text_field`, `ingest.streaming`). `ingest.hf_revision` (a
  branch, tag or commit) pins it: the stage resolves it to the hub's commit once, loads that
  commit, and records it in the manifest (`hf_commit`) and the fingerprint, so a dataset
  pushed again under the same name is ingested again rather than silently reused.

Document ids: a file's path relative to the source root (`file_doc_id`; for the stdlib,
e.g. `json/decoder.py`), `PATH:LINE` for a `.jsonl` record, `PATH:INDEX` for a `.json`
record or `.parquet` row, `SPLIT:INDEX` for a Hugging Face row. A path that is not valid
UTF-8 gets an escaped id instead (`path_id`): UTF-8 text that names its bytes reversibly.
A document longer than `ingest.max_doc_chars` is cut at line breaks into pieces `ID#0`, `ID#1`, ...; every
piece goes to the split of its document, decided by `split_of(ID, val_fraction, seed)`,
a hash of the id, so the split is stable when the corpus grows.

Cleaning, each step counted in the report: files that look binary are skipped; bytes
that are not UTF-8 (and lone surrogates from JSON escapes) become U+FFFD; NUL characters
are removed; optional Unicode NFC; pieces shorter than `ingest.min_chars` are dropped; then
the quality filters of tasks/ingest_filters.py (`ingest.filters`); then, among the documents
left, exact duplicates (same cleaned text) and near duplicates (`ingest.filters.near_dedup`),
each cluster keeping its earliest document (tasks/ingest_dedup.py). Files are read in
blocks, so memory is bounded by `max_doc_chars`, not by the size of a file or corpus.

The work runs in chunks, so it can run on many processes or machines (Prefect task runs on
the configured task runner, see flows/prepare.py; plain calls in order without Prefect):
1. `ingest_chunk`, once per chunk of consecutive source files of about `ingest.chunk_bytes`
   (an `hf:` source is one chunk: its reader is sequential): reads, cuts, cleans and filters
   the chunk's documents, writes the survivors to a part file `parts/<chunk>.arrow` and their
   dedup keys to `parts/<chunk>.keys` (in the stage's build directory, or in the workspace
   when the workers may be other machines), and returns its counters;
2. `find_duplicates` joins the keys one bucket (of `ingest.dedup_buckets`) at a time;
3. the parts, read back in chunk order without the duplicates, are written by `corpus_writer`.
Counters add up in chunk order and row groups are cut by characters in document order, so
the corpus and the manifest are byte for byte the same whatever the number of chunks,
buckets or workers, and neither setting is part of the fingerprint.

A file that cannot be read as what its name says (a corrupt or truncated Parquet or
compressed file, a JSON file cut short) is skipped and listed with the reason in the report
(`ingest.on_unreadable: skip`), or stops the stage with a UserError naming it (`fail`). A
listed file that does not exist where its chunk runs (a worker that does not mount the source)
always stops the stage, naming the file and the worker's host: skipping it would silently
leave it out of the corpus.
Text and JSON Lines files may be compressed (`.gz`, `.bz2`, `.zst`, `.lz4`): such a file is
decompressed once to check it is whole before any of its documents are read.

Output `<workspace>/ingest/<fingerprint>/corpus.parquet` with string columns `id`, `text`,
`split` ("train"/"val"), documents in source order, zstd, row groups of about
`CORPUS_ROW_GROUP_CHARS` characters (`read_corpus` streams it back in batches).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import re
import socket
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.data import SPLITS
from model.errors import UserError
from tasks.core.progress import StepProgress, step_progress
from tasks.core.stage_state import finished
from tasks.core.stopping import check_stop, stop_on_signals
from tasks.core.storage import filesystem
from tasks.core.workspace import StageDir, StageOutput, atomic_path, fingerprint, sha256_file
from tasks.ingest_dedup import KeyTable, band_keys, exact_key, find_duplicates, position
from tasks.ingest_filters import EXAMPLES_KEPT, DocumentFilter, FilterConfig, FilterCounts
from tasks.ingest_readers import UNREADABLE, Unreadable, check_whole, open_file, text_kind

# 2: quality filters, near-duplicate removal, unreadable files. 3: chunked ingest; a cluster of
# near duplicates keeps its earliest document (the old rule, drop a document near a kept one,
# depends on the order documents were kept in, which chunks cannot share), MinHash with its
# own vectorised hashes (tasks/ingest_dedup.py); exact duplicates counted after the filters.
FORMAT_VERSION = 3
STDLIB = "python-stdlib"
HF_PREFIX = "hf:"
CORPUS_FILE = "corpus.parquet"
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("split", pa.string())])
# A chunk's documents before dedup: the corpus's columns and the text's UTF-8 bytes.
PART_SCHEMA = CORPUS_SCHEMA.append(pa.field("bytes", pa.int64()))
# Row groups of ~1M characters: readers hold one at a time, and Arrow's allocator
# (mimalloc) keeps a few of them cached, so their size bounds readers' memory.
CORPUS_ROW_GROUP_CHARS = 1 << 20

TEXT_SUFFIXES = (".txt", ".md", ".py")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages"}
STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}

READ_BYTES = 1 << 20  # files are read and decoded in blocks of this size
BINARY_SNIFF_BYTES = 8192
BINARY_ODD_SHARE = 0.3
# Control characters that do not occur in text, and the lone surrogates that
# `surrogateescape` decoding makes of bytes that are not UTF-8.
_ODD_CHARS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f\udc80-\udcff]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_BYTE_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}")  # how `path_id` writes a byte
_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f]")


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(STDLIB, description="python-stdlib, a file, directory or glob, or hf:NAME")
    include_tests: bool = Field(False, description="python-stdlib: keep test/, tests/, idle_test/")
    text_field: str = Field("text", description="the text of a .jsonl/.json record, .parquet or hf row")
    hf_config: str | None = Field(None, description="hf: the dataset's configuration (subset), if it has several")
    hf_split: str = Field("train", description="hf: the split to read")
    hf_revision: str | None = Field(None, description="hf: a branch, tag or commit, resolved to its commit")
    streaming: bool = Field(False, description="hf: stream rows instead of downloading first")
    nfc: bool = Field(False, description="normalize text to Unicode NFC")
    max_doc_chars: int = Field(1_000_000, ge=1, description="longer documents are cut into pieces")
    min_chars: int = Field(64, ge=0, description="shorter documents are dropped")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of document ids in the val split")
    seed: int = Field(0, description="salt of the split hash")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="quality filters, near-dedup")
    on_unreadable: Literal["skip", "fail"] = Field("skip", description="a file that cannot be read: skip or fail")
    chunk_bytes: int = Field(
        16 << 20, ge=1, description="source bytes per ingest task run (does not change the corpus)"
    )
    dedup_buckets: int = Field(
        64, ge=1, description="dedup keys are joined one bucket at a time (does not change the corpus)"
    )

    @model_validator(mode="after")
    def _revision_of_a_hub_source(self) -> IngestConfig:
        if self.hf_revision is not None and not self.source.startswith(HF_PREFIX):
            raise ValueError(f"hf_revision pins an {HF_PREFIX}NAME source, not {self.source!r}")
        return self


class IngestOutput(StageOutput):
    corpus: Path  # corpus.parquet


# -- the document split -------------------------------------------------------------


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """ "val" for a `val_fraction` share of document ids, by hash: stable, order-independent."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def file_doc_id(path: Path, root: Path) -> str:
    """A file's document id: its path relative to the source root, with '/' separators
    (escaped by `path_id` when it is not valid UTF-8)."""
    return path_id(path.relative_to(root).as_posix())


def path_id(path: str) -> str:
    """`path` as UTF-8 text that names its bytes unambiguously and reversibly.

    A file name is bytes; Python hands the bytes that are not UTF-8 over as lone surrogates
    (`surrogateescape`), which Parquet, JSON, hashes and terminals refuse. A valid UTF-8
    path is its own id, unchanged (the train/val split hashes ids). Any other path, and the
    rare valid one that holds text like an escape (a backslash, 'x', two hex digits), is
    written with each byte that is not UTF-8 as `\\xNN` and each backslash as `\\x5c`: in
    such an id every `\\xNN` is one byte, and an id without one is the path itself.
    """
    if not _SURROGATES.search(path) and not _BYTE_ESCAPE.search(path):
        return path
    raw = os.fsencode(path).replace(b"\\", b"\\x5c")  # the path's bytes, as the file system holds them
    return raw.decode("utf-8", "backslashreplace")


def shown_path(path: Path | str) -> str:
    """A path for a one-line message: escaped as `path_id` does, and its control characters
    (a newline or tab in a file name) written as escapes too."""
    return _CONTROL_CHARS.sub(lambda m: m[0].encode("unicode_escape").decode(), path_id(str(path)))


# -- finding the files of a source ----------------------------------------------------


@dataclass(frozen=True)
class SourceFiles:
    root: Path  # document ids are paths relative to this directory
    files: list[Path]  # sorted by document id


def find_source_files(config: IngestConfig) -> SourceFiles | None:
    """The files a file-based source names (None for `hf:`); a UserError if there are none."""
    if config.source == STDLIB:
        return stdlib_files(config.include_tests)
    if config.source.startswith(HF_PREFIX):
        return None
    return local_files(config.source)


def stdlib_files(include_tests: bool = False) -> SourceFiles:
    """The `.py` files of the running Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = STDLIB_EXCLUDED_DIRS | (set() if include_tests else STDLIB_TEST_DIRS)
    files = [p for p in root.rglob("*.py") if not excluded & set(p.relative_to(root).parts[:-1])]
    if not files:
        raise UserError(f"ingest.source {STDLIB}: no .py files under {root}")
    return SourceFiles(root, sorted(files, key=lambda p: file_doc_id(p, root)))


def local_files(source: str) -> SourceFiles:
    supported = "/".join(SUPPORTED_SUFFIXES) + ", text and JSON compressed as .gz/.bz2/.zst/.lz4"
    unlisted: list[Path] = []
    if has_wildcard(source):
        matches = [Path(m) for m in glob.glob(source, recursive=True) if is_file(Path(m))]
        if not matches:
            raise UserError(f"ingest.source: the glob {source!r} matches no files")
        root = glob_root(source)
    elif (path := Path(source)).is_dir():
        root = path
        matches, unlisted = tree_files(path)
        matches += unlisted  # reading one fails: it is counted as unreadable, under its own name
    elif path.is_file():
        if text_kind(path) not in SUPPORTED_SUFFIXES:
            raise UserError(f"ingest.source: {source}: unsupported file type (use {supported})")
        return SourceFiles(path.parent, [path])
    else:
        raise UserError(f"ingest.source: {source}: no such file or directory")
    files = [p for p in matches if text_kind(p) in SUPPORTED_SUFFIXES or p in unlisted]
    if not files:
        raise UserError(f"ingest.source: {source!r} has {len(matches)} files but none of type {supported}")
    return SourceFiles(root, sorted(files, key=lambda p: file_doc_id(p, root)))


def tree_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The files under `root`, hidden ones (a name starting with '.') and their contents aside;
    and the directories that cannot be listed (a path beyond the system's limit, which a
    directory can still hold)."""
    files: list[Path] = []
    unlisted: list[Path] = []
    for directory, subdirectories, names in os.walk(root, onerror=lambda e: unlisted.append(Path(e.filename))):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        # Regular files only (following links): a named pipe or a broken link is not a document.
        files += [path for name in names if not name.startswith(".") and is_file(path := Path(directory, name))]
    return files, unlisted


def is_file(path: Path) -> bool:
    """A regular file, or a name too long to reach (a path beyond the system's limit, which a
    directory can still hold): reading it fails, and it is counted as unreadable."""
    try:
        return path.is_file()
    except OSError:
        return True


def file_stat(path: Path) -> tuple[int, int]:
    """(size, mtime in ns); (-1, -1) for a file that cannot be reached (see `is_file`)."""
    try:
        stat = path.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def has_wildcard(text: str) -> bool:
    return any(char in text for char in "*?[")


def glob_root(pattern: str) -> Path:
    """The directory a glob searches in: its leading parts without wildcards."""
    return Path(*itertools.takewhile(lambda part: not has_wildcard(part), Path(pattern).parts))


def source_signature(files: SourceFiles | None) -> str:
    """What identifies the source's contents cheaply: each file's id, size and mtime.

    `hf:` sources are identified by their name, config and split (in the config), and by
    the commit `ingest.hf_revision` resolves to when it is set (`pinned_commit`).
    """
    digest = hashlib.sha256()
    for path in files.files if files else []:
        size, mtime = file_stat(path)
        digest.update(f"{file_doc_id(path, files.root)}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


# -- reading documents ----------------------------------------------------------------


@dataclass
class IngestStats:
    """The counters of the ingest report."""

    files_read: int = 0
    files_binary_skipped: int = 0
    files_without_text_field: int = 0  # .parquet files without the ingest.text_field column
    records_without_text: int = 0  # JSON records and rows without a string ingest.text_field
    documents_in: int = 0  # files, records and rows read
    documents_split: int = 0  # documents longer than ingest.max_doc_chars ...
    pieces_from_splits: int = 0  # ... and the pieces they were cut into
    replaced_bytes: int = 0  # bytes that are not UTF-8 (or lone surrogates), now U+FFFD
    nul_chars_removed: int = 0
    files_unreadable: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"} of each
    dropped_short: int = 0
    dropped_duplicate: int = 0
    dropped_by_filter: dict[str, int] = field(default_factory=dict)  # filter name (or near_duplicate) -> count
    dropped_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    documents_out: int = 0
    documents_train: int = 0
    documents_val: int = 0
    bytes_train: int = 0  # UTF-8 bytes of the kept text
    bytes_val: int = 0

    def kept(self, split: str, n_bytes: int) -> None:
        if split == "train":
            self.documents_train += 1
            self.bytes_train += n_bytes
        else:
            self.documents_val += 1
            self.bytes_val += n_bytes


@dataclass
class SourceDocument:
    id: str
    chunks: Iterable[str]  # the text, possibly streamed from disk in blocks


def source_documents(
    config: IngestConfig, files: SourceFiles | None, commit: str | None, stats: IngestStats, progress: StepProgress
) -> Iterator[SourceDocument]:
    if files is None:
        yield from hf_documents(config, commit, stats)
        return
    for path in files.files:
        stats.files_read += 1
        doc_id = file_doc_id(path, files.root)
        before = stats.documents_in
        try:
            yield from file_documents(path, doc_id, config.text_field, stats)
        except FileNotFoundError as e:
            # Listed when the stage started, absent where the chunk runs: not a bad file but a
            # worker that does not see the source (or a source changed under a running stage).
            raise UserError(
                f"ingest: {shown_path(path)}: no such file on {socket.gethostname()}: the ingest's chunks run "
                "on the task runner's workers, so a local source must be on storage every worker mounts, "
                "at the same path"
            ) from e
        except (Unreadable, *UNREADABLE) as e:
            reason = " ".join(str(e).split())  # one line, whatever the library wrote
            if stats.documents_in > before:
                reason += f" (after {stats.documents_in - before} documents)"
            if config.on_unreadable == "fail":
                raise UserError(
                    f"ingest: {shown_path(path)}: unreadable: {reason} (ingest.on_unreadable=skip skips it)"
                ) from e
            stats.files_unreadable += 1
            stats.unreadable.append({"file": doc_id, "reason": reason})
        progress.advance(documents=1, n_bytes=max(file_stat(path)[0], 0))  # here a document is a file


def file_documents(path: Path, doc_id: str, text_field: str, stats: IngestStats) -> Iterator[SourceDocument]:
    kind = text_kind(path)
    if kind in TEXT_SUFFIXES:
        yield from text_file_documents(path, doc_id, stats)
    elif kind == ".jsonl":
        yield from jsonl_documents(path, doc_id, text_field, stats)
    elif kind == ".json":
        yield from json_documents(path, doc_id, text_field, stats)
    else:
        yield from parquet_documents(path, doc_id, text_field, stats)


def text_file_documents(path: Path, doc_id: str, stats: IngestStats) -> Iterator[SourceDocument]:
    check_whole(path)
    with open_file(path) as f:
        head = f.read(READ_BYTES)
        if looks_binary(head[:BINARY_SNIFF_BYTES]):
            stats.files_binary_skipped += 1
            return
        yield SourceDocument(doc_id, decoded_blocks(head, f))


def looks_binary(sample: bytes) -> bool:
    """Binary if many of the first bytes are control characters or not UTF-8."""
    text = sample.decode("utf-8", "surrogateescape")
    return len(_ODD_CHARS.findall(text)) > BINARY_ODD_SHARE * len(text)


def decoded_blocks(first: bytes, rest: BinaryIO) -> Iterator[str]:
    """Decode a file block by block; bytes that are not UTF-8 become lone surrogates here
    (`surrogateescape`) and U+FFFD in `clean`, which counts them."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    block = first
    while block:
        yield decoder.decode(block)
        block = rest.read(READ_BYTES)
    yield decoder.decode(b"", final=True)


def jsonl_documents(path: Path, doc_id: str, text_field: str, stats: IngestStats) -> Iterator[SourceDocument]:
    check_whole(path)
    with open_file(path) as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                text = record_text(line.decode("utf-8", "surrogateescape"), text_field)
                yield from record_document(f"{doc_id}:{line_number}", text, stats)


def json_documents(path: Path, doc_id: str, text_field: str, stats: IngestStats) -> Iterator[SourceDocument]:
    try:
        with open_file(path) as f:
            data = json.loads(f.read().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as e:
        raise Unreadable(f"not valid JSON ({e})") from e
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        text = record.get(text_field) if isinstance(record, dict) else None
        yield from record_document(f"{doc_id}:{index}", text, stats)


def record_text(line: str, text_field: str) -> Any:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get(text_field) if isinstance(record, dict) else None


def record_document(doc_id: str, text: Any, stats: IngestStats) -> Iterator[SourceDocument]:
    if isinstance(text, str):
        yield SourceDocument(doc_id, [text])
    else:
        stats.records_without_text += 1


def parquet_documents(path: Path, doc_id: str, text_field: str, stats: IngestStats) -> Iterator[SourceDocument]:
    with open(path, "rb") as source, pq.ParquetFile(source) as table:  # Python opens it: see open_file
        if text_field not in table.schema_arrow.names:
            stats.files_without_text_field += 1
            return
        index = 0
        for batch in table.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield from record_document(f"{doc_id}:{index}", text, stats)
                index += 1


def pinned_commit(config: IngestConfig) -> str | None:
    """The hub commit `ingest.hf_revision` names now (None when it is not set)."""
    if config.hf_revision is None:
        return None
    return hub_commit(config.source.removeprefix(HF_PREFIX), config.hf_revision)


def hub_commit(name: str, revision: str) -> str:
    """The commit sha of revision `revision` (branch, tag or sha) of hub dataset `name`."""
    from huggingface_hub import HfApi  # comes with datasets; only pinned hf: sources need it
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        return HfApi().dataset_info(name, revision=revision).sha
    except (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, OSError) as e:
        reason = " ".join(str(e).split())
        raise UserError(f"ingest.hf_revision {revision!r} of {HF_PREFIX}{name}: cannot resolve it ({reason})") from e


def hf_documents(config: IngestConfig, commit: str | None, stats: IngestStats) -> Iterator[SourceDocument]:
    import datasets  # slow to import; only hf: sources need it

    name = config.source.removeprefix(HF_PREFIX)
    try:
        dataset = datasets.load_dataset(
            name, config.hf_config, split=config.hf_split, streaming=config.streaming, revision=commit
        )
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise UserError(f"ingest.source {config.source}: cannot load the dataset ({e})") from e
    columns = dataset.column_names
    if columns is not None and config.text_field not in columns:
        raise UserError(
            f"ingest.text_field: {config.text_field!r} is not a column of {config.source} (columns: {columns})"
        )
    for index, row in enumerate(dataset):
        yield from record_document(f"{config.hf_split}:{index}", row.get(config.text_field), stats)


# -- cutting, cleaning, deduplicating ---------------------------------------------------


def split_long(chunks: Iterable[str], max_chars: int) -> Iterator[str]:
    """The text of `chunks` in pieces of at most `max_chars`, cut after the last line break
    that fits, or hard at `max_chars` when a line is longer."""
    buffer = ""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) > max_chars:
            cut = buffer.rfind("\n", 0, max_chars) + 1 or max_chars
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def named_pieces(doc_id: str, pieces: Iterator[str]) -> Iterator[tuple[str, str]]:
    """`(id, text)` for a document that fits, `(id#0, ...), (id#1, ...)` for one that was cut."""
    previous, index = next(pieces, None), 0
    if previous is None:
        return
    for piece in pieces:
        yield f"{doc_id}#{index}", previous
        previous, index = piece, index + 1
    yield (f"{doc_id}#{index}" if index else doc_id), previous


def clean(text: str, nfc: bool, stats: IngestStats) -> str:
    text, replaced = _SURROGATES.subn("\ufffd", text)
    stats.replaced_bytes += replaced
    if "\x00" in text:
        stats.nul_chars_removed += text.count("\x00")
        text = text.replace("\x00", "")
    return unicodedata.normalize("NFC", text) if nfc else text


class BatchWriter:
    """Appends rows of `schema` (its first columns `id`, `text`, `split`) and hands them to
    `sink` (a Parquet or Arrow IPC file writer) in batches of ~1M characters of text: the
    corpus's row groups, a part's record batches."""

    def __init__(self, schema: pa.Schema, sink: pq.ParquetWriter | pa.ipc.RecordBatchFileWriter):
        self._schema = schema
        self._sink = sink
        self._columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._chars = 0
        self.rows = 0

    def add(self, *row: Any) -> int:
        """Append a row (one value per column of the schema); its index in the file."""
        for name, value in zip(self._schema.names, row, strict=True):
            self._columns[name].append(value)
        self._chars += len(self._columns["text"][-1])
        if self._chars >= CORPUS_ROW_GROUP_CHARS:
            self.flush()
        self.rows += 1
        return self.rows - 1

    def flush(self) -> None:
        if self._columns["id"]:
            self._sink.write_table(pa.table(self._columns, schema=self._schema))
            self._columns = {name: [] for name in self._schema.names}
            self._chars = 0

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()
        self._sink.close()


def corpus_writer(path: Path) -> BatchWriter:
    """The corpus Parquet file, one row group per batch."""
    return BatchWriter(CORPUS_SCHEMA, pq.ParquetWriter(path, CORPUS_SCHEMA, compression="zstd"))


def part_writer(sink: pa.NativeFile) -> BatchWriter:
    """A chunk's documents that pass the filters, in an Arrow IPC file."""
    return BatchWriter(PART_SCHEMA, pa.ipc.new_file(sink, PART_SCHEMA))


# -- chunks: read and filter in parallel, deduplicate, write in order ----------------------


class IngestChunk(BaseModel):
    """One `ingest_chunk` call: consecutive files of the source (all of an `hf:` source)."""

    index: int
    config: IngestConfig
    root: Path | None  # document ids are paths relative to it (None: an hf: source)
    files: list[Path] | None  # None: the hf: source, read in one chunk (its reader is sequential)
    commit: str | None
    parts: Path | str  # the directory (or s3:// URI) the part and key files go to


class ChunkResult(BaseModel):
    index: int
    stats: IngestStats  # the chunk's counters; documents kept, split and bytes are counted after dedup
    key_offsets: list[int]  # where each dedup bucket starts in the chunk's key file


def part_name(index: int) -> str:
    return f"{index:05d}.arrow"


def keys_name(index: int) -> str:
    return f"{index:05d}.keys"


def plan_chunks(
    config: IngestConfig, files: SourceFiles | None, commit: str | None, parts: Path | str
) -> list[IngestChunk]:
    """Consecutive files of about `ingest.chunk_bytes` per chunk; one chunk for an `hf:` source."""
    if files is None:
        return [IngestChunk(index=0, config=config, root=None, files=None, commit=commit, parts=parts)]
    groups: list[list[Path]] = [[]]
    size = 0
    for path in files.files:
        if groups[-1] and size >= config.chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += max(file_stat(path)[0], 0)
    # Absolute paths: a worker elsewhere reads the same path (ids, relative to the root, are unchanged).
    return [
        IngestChunk(
            index=index,
            config=config,
            root=files.root.absolute(),
            files=[path.absolute() for path in group],
            commit=commit,
            parts=parts,
        )
        for index, group in enumerate(groups)
    ]


def ingest_chunk(chunk: IngestChunk) -> ChunkResult:
    """Read a chunk's files, cut, clean and filter their documents; write the survivors to the
    chunk's part file and their dedup keys to its key file (tasks/ingest_dedup.py)."""
    config = chunk.config
    files = None if chunk.files is None else SourceFiles(chunk.root, chunk.files)
    stats = IngestStats()
    quality = DocumentFilter(config.filters)
    filters = config.filters
    keys = KeyTable()
    total = len(chunk.files) if chunk.files is not None else None
    fs, parts = filesystem(chunk.parts)
    with (
        fs.open_output_stream(f"{parts}/{part_name(chunk.index)}") as sink,
        part_writer(sink) as part,
        step_progress(f"ingest: chunk {chunk.index}", total) as progress,
    ):
        for document in source_documents(config, files, chunk.commit, stats, progress):
            check_stop()
            stats.documents_in += 1
            if files is None:
                progress.advance(documents=1)
            split = split_of(document.id, config.val_fraction, config.seed)
            pieces = 0
            for piece_id, raw in named_pieces(document.id, split_long(document.chunks, config.max_doc_chars)):
                pieces += 1
                text = clean(raw, config.nfc, stats)
                if len(text) < config.min_chars:
                    stats.dropped_short += 1
                    continue
                if not quality.keep(piece_id, text):
                    continue
                data = text.encode()
                pos = position(chunk.index, part.add(piece_id, text, split, len(data)))
                keys.add(pos, exact_key(data), near=False)
                if filters.near_dedup:
                    for key in band_keys(data, filters.near_dedup_shingle_words, filters.near_dedup_threshold):
                        keys.add(pos, key, near=True)
            if pieces > 1:
                stats.documents_split += 1
                stats.pieces_from_splits += pieces
    stats.dropped_by_filter, stats.dropped_examples = quality.counts.dropped, quality.counts.examples
    with fs.open_output_stream(f"{parts}/{keys_name(chunk.index)}") as sink:
        offsets = keys.save(sink, config.dedup_buckets)
    return ChunkResult(index=chunk.index, stats=stats, key_offsets=offsets)


def run_in_order(chunks: list[IngestChunk]) -> list[ChunkResult]:
    """How chunks run without Prefect: one after the other, in this process."""
    return [ingest_chunk(chunk) for chunk in chunks]


def merged_stats(results: list[ChunkResult]) -> IngestStats:
    """The chunks' counters added up in chunk order: the same report for any chunking
    (examples are the first `EXAMPLES_KEPT` in source order)."""
    stats = IngestStats()
    for result in results:
        part = result.stats
        for name, value in asdict(part).items():
            if isinstance(value, int):
                setattr(stats, name, getattr(stats, name) + value)
        stats.unreadable += part.unreadable
        for name, count in part.dropped_by_filter.items():
            stats.dropped_by_filter[name] = stats.dropped_by_filter.get(name, 0) + count
        for name, examples in part.dropped_examples.items():
            kept = stats.dropped_examples.setdefault(name, [])
            kept += examples[: EXAMPLES_KEPT - len(kept)]
    return stats


def write_corpus(
    config: IngestConfig,
    files: SourceFiles | None,
    commit: str | None,
    path: Path,
    parts: Path | str,
    map_chunks: Callable[[list[IngestChunk]], list[ChunkResult]] = run_in_order,
) -> IngestStats:
    """Run the chunks (`map_chunks`, results in chunk order), find the duplicates, and write
    the parts' other documents in order to `path` with `corpus_writer`: the same row groups,
    so the same bytes, whatever the chunking. `parts` is the directory (or s3:// URI) of the
    chunks' part and key files."""
    fs, parts_root = filesystem(parts)
    fs.create_dir(parts_root)
    with stop_on_signals():  # the chunks may run on threads that signals do not reach
        results = map_chunks(plan_chunks(config, files, commit, parts))
    stats = merged_stats(results)
    key_files = [(f"{parts_root}/{keys_name(result.index)}", result.key_offsets) for result in results]
    duplicates = find_duplicates(fs, key_files, config.dedup_buckets)
    near = FilterCounts()
    shown_roots = {duplicates.near[pos] for pos in sorted(duplicates.near)[:EXAMPLES_KEPT]}
    root_ids: dict[int, str] = {}  # the ids of the clusters' kept documents the examples name
    with corpus_writer(path) as writer:
        for result in results:
            # Read, not memory-mapped: mapped pages would stay in the resident set.
            with fs.open_input_file(f"{parts_root}/{part_name(result.index)}") as source:
                reader = pa.ipc.open_file(source)
                row = 0
                for group in range(reader.num_record_batches):
                    batch = reader.get_batch(group).to_pydict()
                    for doc_id, text, split, n_bytes in zip(batch["id"], batch["text"], batch["split"], batch["bytes"]):
                        pos = position(result.index, row)
                        row += 1
                        if pos in shown_roots:
                            root_ids[pos] = doc_id
                        if pos in duplicates.exact:
                            stats.dropped_duplicate += 1
                        elif pos in duplicates.near:
                            near.drop("near_duplicate", doc_id, text, near=root_ids.get(duplicates.near[pos]))
                        else:
                            writer.add(doc_id, text, split)
                            stats.kept(split, n_bytes)
    fs.delete_dir(parts_root)
    for name, count in near.dropped.items():
        stats.dropped_by_filter[name] = count
        stats.dropped_examples[name] = near.examples[name]
    stats.documents_out = stats.documents_train + stats.documents_val
    return stats


def check_usable(config: IngestConfig, stats: IngestStats) -> None:
    """The only fatal corpus problems: nothing usable at all, or an empty split."""
    if stats.documents_out == 0:
        counts = ", ".join(f"{name}={count}" for name, count in asdict(stats).items() if count)
        hint = f"ingest.min_chars is {config.min_chars}"
        if stats.records_without_text or stats.files_without_text_field:
            hint += f"; ingest.text_field {config.text_field!r} is missing in records or files"
        raise UserError(f"ingest.source {config.source!r}: no usable document ({counts or 'nothing read'}); {hint}")
    for split in SPLITS:
        if getattr(stats, f"documents_{split}") == 0:
            change = "raise" if split == "val" else "lower"
            raise UserError(
                f"ingest: the {split} split is empty ({stats.documents_out} documents, "
                f"ingest.val_fraction={config.val_fraction}): {change} ingest.val_fraction or add documents"
            )


# -- the stage ------------------------------------------------------------------------


def ingest_fingerprint(config: IngestConfig, files: SourceFiles | None, commit: str | None) -> str:
    """`commit`: what `pinned_commit` resolved `ingest.hf_revision` to. It stands in the inputs
    for the revision: a branch and the sha it points at name the same corpus. Unpinned, the
    inputs are what they were before the setting existed, so existing fingerprints hold."""
    # `streaming` changes how rows arrive, not which rows: it is not part of the result. The
    # default filter preset (code) is left out, so the fingerprints from before presets hold.
    # Nor does how the work is cut into chunks and buckets.
    excluded: dict[str, Any] = {"streaming": True, "hf_revision": True, "chunk_bytes": True, "dedup_buckets": True}
    if config.filters.preset == "code":
        excluded["filters"] = {"preset"}
    settings = config.model_dump(mode="json", exclude=excluded)
    inputs = {"source": source_signature(files)} | ({"hf_commit": commit} if commit else {})
    return fingerprint("ingest", settings, inputs, FORMAT_VERSION)


def run_ingest(
    config: IngestConfig,
    workspace: Path | str,
    map_chunks: Callable[[list[IngestChunk]], list[ChunkResult]] = run_in_order,
    parts_in_workspace: bool = False,
) -> IngestOutput:
    """Read the source into `<workspace>/ingest/<fingerprint>/corpus.parquet` (or reuse it).

    `map_chunks(chunks)` runs `ingest_chunk` on each chunk (in order here; as Prefect task
    runs in the prepare flow) and returns their results in chunk order. The part and key
    files go to the local build directory, or with `parts_in_workspace` to the workspace
    itself, for workers on other machines that share only the workspace (as the shard
    stage's parts do)."""
    files = find_source_files(config)
    commit = pinned_commit(config)
    stage = StageDir(workspace, "ingest", ingest_fingerprint(config, files, commit))

    def build(directory: Path) -> dict[str, Any]:
        corpus = directory / CORPUS_FILE
        parts = f"{stage.location}/parts" if parts_in_workspace else directory / "parts"
        with atomic_path(corpus) as tmp:
            stats = write_corpus(config, files, commit, tmp, parts, map_chunks)
            check_usable(config, stats)
        return {
            "format": FORMAT_VERSION,
            "fingerprint": stage.fingerprint,
            "source": config.source,
            **({"hf_revision": config.hf_revision, "hf_commit": commit} if commit else {}),
            "files": [{"path": CORPUS_FILE, "rows": stats.documents_out, "sha256": sha256_file(corpus)}],
            "report": asdict(stats),
        }

    return IngestOutput.build_once(stage, build, corpus=CORPUS_FILE)


def read_corpus(corpus: Path, split: str | None = None, batch_rows: int = 512) -> Iterator[pa.RecordBatch]:
    """The corpus in order, in record batches (`id`, `text`, `split`), optionally one split only.

    Memory is bounded by a batch and the corpus row group it comes from.
    """
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=batch_rows):
        yield batch if split is None else batch.filter(pc.equal(batch.column("split"), split))


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(
    config: IngestConfig,
    workspace: Path | str,
    map_chunks: Callable[[list[IngestChunk]], list[ChunkResult]] = run_in_order,
    parts_in_workspace: bool = False,
) -> IngestOutput:
    """Prefect task over `run_ingest`; the stage directory's manifest does the caching."""
    return finished(run_ingest(config, workspace, map_chunks, parts_in_workspace))


@task(name="ingest-chunk", cache_policy=NO_CACHE)
def ingest_chunk_task(chunk: IngestChunk) -> ChunkResult:
    """Prefect task over `ingest_chunk`: one chunk of the ingest stage."""
    return ingest_chunk(chunk)
