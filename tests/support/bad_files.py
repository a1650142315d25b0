"""Files that are not what their names say: shared by the bad-input catalogue and the ingest's
unreadable-file tests."""

import gzip
import json

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
