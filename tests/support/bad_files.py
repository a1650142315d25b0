"""Files that are not what their names say: shared by the bad-input catalogue and the ingest's
unreadable-file tests."""

import gzip
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


TEXT = "def f(x):\n    return x + 1\n" * 4
BINARY = bytes(range(256)) * 8


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


PARQUET = parquet_bytes(pa.table({"text": [TEXT] * 50}))
UNREADABLE_FILES = {
    "named.parquet": b"not Parquet at all" * 8,  # no magic bytes
    "cut.parquet": half(PARQUET),  # truncated: no footer
    "half.json": json.dumps([{"text": TEXT}] * 4)[:60],
    "cut.txt.gz": half(gzip.compress(TEXT.encode() * 50)),
    "cut.jsonl.zst": half(pa.compress(json.dumps({"text": TEXT}).encode() * 50, codec="zstd", asbytes=True)),
}


# File names that a file system holds and a pipeline finds hard to carry, as the bytes they are.
HOSTILE_NAMES: dict[str, bytes] = {
    "not-utf8": b"\xff\xfe.txt",  # Latin-1 bytes, as old archives and other locales write them
    "not-utf8-in-a-directory": b"d\xe9j\xe0/vu.py",
    "newline": b"new\nline.py",
    "tab": b"tab\there.py",
    "control-characters": b"bell\x07esc\x1b[31m.md",
    "longest-name": b"n" * 252 + b".py",  # 255 bytes, the most a name may have
    "long-path": b"/".join([b"d" * 200] * 15) + b"/deep.py",  # about 3 KB, within the system's limit
    "case-upper": b"Case.py",
    "case-lower": b"case.py",
    "unicode-nfc": "caf\u00e9.py".encode(),
    "unicode-nfd": "cafe\u0301.py".encode(),
    "escape-lookalike": b"back\\xffslash.py",  # valid UTF-8 that reads like an escaped byte
}
# A path longer than the system's limit (PATH_MAX, 4096 bytes): a directory holds it, but no
# call can open it by its path.
BEYOND_PATH_MAX = b"/".join([b"p" * 250] * 17) + b"/far.py"


def write_at(directory: Path, name: bytes, data: bytes) -> None:
    """Write `directory/name`, creating its directories one at a time relative to the last, so
    that a path longer than the system's limit can be made."""
    *parents, leaf = name.split(b"/")
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_DIRECTORY)
    try:
        for part in parents:
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(part, os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    finally:
        os.close(fd)


def module_text(index: int) -> str:
    """A small Python module of its own: no two are near duplicates."""
    words = [
        "total",
        "count",
        "width",
        "offset",
        "scale",
        "limit",
        "ratio",
        "depth",
        "index",
        "value",
        "score",
        "steps",
    ]
    return "".join(
        f"def {words[(index + k) % len(words)]}_{index}_{k}(x):\n    return x * {index * 31 + k} - {k}\n\n"
        for k in range(6)
    )


def name_of(doc_id: str) -> bytes:
    """The file name a document id stands for, decoded by the rule alone: an id holding `\\xNN`
    is escaped, and each `\\xNN` in it is one byte; any other id is its name's UTF-8."""
    if not re.search(r"\\x[0-9a-fA-F]{2}", doc_id):
        return doc_id.encode()
    return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), doc_id.encode())
