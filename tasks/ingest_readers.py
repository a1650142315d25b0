"""Opening the ingest's source files, compressed or not, and telling an unreadable one apart.

A text or JSON Lines file may be compressed; its suffix says how (`notes.txt.gz`,
`rows.jsonl.zst`), and Arrow's codecs decompress it (the standard library has no zstd).
A compressed file that ends early only fails at its end, after its first documents would
have been written, so `check_whole` decompresses it once, to nowhere, before it is read.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa

COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}
CHECK_BYTES = 1 << 20
# What reading a broken file raises: I/O and codec errors (OSError), Arrow's refusals
# (a file named .parquet that is not Parquet: ArrowInvalid), bad JSON, bad UTF-8 in a name.
UNREADABLE = (OSError, EOFError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError)


class Unreadable(Exception):
    """A file is not what its name says; the message is the reason."""


def text_kind(path: Path) -> str:
    """The suffix that says what a file holds, under any compression suffix: `.jsonl` for `a.jsonl.gz`."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def compression(path: Path) -> str | None:
    return COMPRESSION_SUFFIXES.get(path.suffix.lower())


def open_file(path: Path) -> BinaryIO:
    """The file's bytes, decompressed if its suffix says it is compressed.

    Python opens the file, not Arrow: Arrow takes a path as UTF-8 text, and a file name
    need not be UTF-8."""
    raw = open(path, "rb")
    if (codec := compression(path)) is None:
        return raw
    return io.BufferedReader(pa.input_stream(raw, compression=codec))


def check_whole(path: Path) -> None:
    """Decompress a compressed file to the end: raises (OSError, ArrowException) if it is cut
    short or corrupt. A plain file needs no check."""
    if compression(path) is None:
        return
    with open_file(path) as f:
        while f.read(CHECK_BYTES):
            pass
