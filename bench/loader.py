"""Loader throughput: tokens/s that `model.data.WindowLoader` delivers in training order.

    python bench/loader.py [--manifest workspace/shard/<fp>/manifest.json] [--workers 0 2] [--quick]

Reads the shards of `gptflow prepare` (the newest under ./workspace by default; otherwise it
writes random-token shards like the tiny preset's in the loader's format) and times
whole shuffled epochs of batches of 16 x 256: row-group reads, decompression, the shuffle
buffer and the conversion to int64 tensors. Prints the median of the runs with their range.
Target: at least 5M tokens/s, and 20x what training consumes (bench/train.py prints both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.data import ShardManifest, WindowLoader  # noqa: E402
from model.integrity import MANIFEST, sha256_file  # noqa: E402

BATCH = 16


def find_manifest() -> Path | None:
    manifests = sorted(Path("workspace/shard").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return manifests[-1] if manifests else None


def random_shards(directory: Path, windows: int, seq_len: int = 256, vocab_size: int = 8192) -> Path:
    """Train shards of random token ids (vocabulary 8,192, uint16), about as compressible as real ones.

    Written here in model/data.py's format (a `tokens` column of seq_len + 1 ids per window,
    zstd row groups of about 4 MB, a manifest with each file's sha256) rather than with the
    shard stage's writer: bench/gpu.py runs where tasks/ and its dependencies are not installed."""
    rows_per_group = max(1, (4 << 20) // ((seq_len + 1) * 2))
    stream = np.random.default_rng(0).integers(0, vocab_size, (windows, seq_len + 1), dtype=np.uint16)
    path = directory / "train-00000.parquet"
    column = pa.FixedSizeListArray.from_arrays(pa.array(stream.reshape(-1)), seq_len + 1)
    pq.write_table(pa.table({"tokens": column}), path, row_group_size=rows_per_group, compression="zstd")
    entry = {"path": path.name, "split": "train", "rows": windows, "tokens": stream.size, "sha256": sha256_file(path)}
    manifest = ShardManifest.model_validate({"seq_len": seq_len, "vocab_size": vocab_size, "files": [entry]})
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json()))
    return directory / MANIFEST


def loader_tokens_per_s(manifest: Path, workers: int = 0, runs: int = 5, max_batches: int | None = None) -> list[float]:
    """Tokens/s of one shuffled epoch (or `max_batches`), from a fresh loader each run."""
    rates = []
    for run in range(runs):
        loader = WindowLoader(manifest, "train", BATCH, seed=run, workers=workers)
        batches = max_batches or loader.num_windows // BATCH
        start = time.perf_counter()
        tokens = sum(inputs.numel() for inputs, _ in islice(loader, batches))
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def describe(rates: list[float], unit: str = "tokens/s") -> str:
    return f"{statistics.median(rates):,.0f} {unit} (range {min(rates):,.0f} - {max(rates):,.0f}, {len(rates)} runs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, help="a shard manifest.json (default: the newest under ./workspace)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke mode: small random shards, 2 short runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        manifest = None if args.quick else args.manifest or find_manifest()
        if manifest is None:
            manifest = random_shards(Path(scratch), windows=500 if args.quick else 12_000)
        print(f"shards: {manifest}")
        for workers in args.workers:
            rates = loader_tokens_per_s(
                manifest, workers, runs=2 if args.quick else args.runs, max_batches=20 if args.quick else None
            )
            print(f"loader, {workers} workers: {describe(rates)}")


if __name__ == "__main__":
    main()
