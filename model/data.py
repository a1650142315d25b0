"""The shard loader: (inputs, targets) batches from the Parquet windows of one split.

The global order. All windows of a split, over all epochs, form one sequence; the state of
a run is a single position in it. Epoch `e` covers positions [e*N, (e+1)*N) and is a
permutation of the N windows, so every window is seen exactly once per epoch. A
permutation of single rows would need random single-row reads, which Parquet does slowly;
instead the epoch shuffles at two levels, both seeded by (seed, epoch):

    1. the row groups (a few hundred windows each) are permuted;
    2. consecutive runs of `buffer_row_groups` of them form a chunk whose windows are
       permuted again: a shuffle buffer that is read whole and held in memory.

Ranks. Each optimizer micro-step takes the next `world_size * batch_size` positions; rank
`r` gets the r-th `batch_size` of them. No two ranks share a window, and the order does not
depend on the number of ranks: a run saved on N ranks resumes on M ranks at the same
position and sees exactly the remaining windows.

DataLoader workers. With `workers > 0`, worker `w` builds the rank's batches w, w + workers,
..., and the DataLoader hands them back round-robin, i.e. in the rank's order. The position
counts the batches handed to the caller, so prefetched batches are not skipped on resume.
Every rank and worker decodes the chunks it draws from whole (a few MB each): cheap next to
training, as bench/loader.py shows.

Every file of the split is checked against its sha256 in the manifest when the loader is
created; a modified shard is refused, naming the file.

`ShardManifest` is the typed `manifest.json` of a shard directory: the shard stage writes
it and every reader (this loader, evaluation, pretraining, the registry's gate) reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ValidationError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.errors import UserError
from model.integrity import MANIFEST, inside, verify_files

SPLITS = ("train", "val")  # the corpus' splits, in the order their shards are written


class ShardFile(BaseModel):
    """One Parquet file of windows; `tokens` is `rows * (seq_len + 1)`."""

    path: str  # relative to the shard directory
    split: str
    rows: int
    tokens: int
    row_groups: int | None = None  # written by the shard stage; absent from hand-made test shards
    bytes: int | None = None
    sha256: str


class SplitTotals(BaseModel):
    rows: int
    tokens: int
    dropped_tokens: int  # stream tokens after the last window
    documents: int
    stream_tokens: int


class ShardManifest(BaseModel):
    """A shard directory's `manifest.json` (docs: DESIGN.md, "Formats"), fields in file order.

    Only what the readers need is required: shards made by hand (tests, benchmarks) list
    their windows without the stage's lineage and totals.
    """

    format: int | None = None
    fingerprint: str | None = None
    inputs: dict[str, str] | None = None  # the corpus and tokenizer fingerprints
    seq_len: int
    stride: int | None = None
    dtype: str | None = None
    vocab_size: int
    tokenizer_sha256: str | None = None
    eos_id: int | None = None
    compression: str | None = None
    row_group_rows: int | None = None
    files: list[ShardFile]
    totals: dict[str, SplitTotals] | None = None
    report: dict[str, int] | None = None

    @classmethod
    def read(cls, path: Path | str) -> ShardManifest:
        """The manifest at `path` (a manifest.json or the shard directory holding one)."""
        path = Path(path)
        path = path / MANIFEST if path.is_dir() else path
        try:
            return cls.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            raise UserError(f"{path}: unreadable shard manifest ({e})") from None

    def split_files(self, split: str) -> list[ShardFile]:
        return [entry for entry in self.files if entry.split == split]

    def to_json(self) -> dict[str, Any]:
        """The manifest as the shard stage commits it (fields unset by hand-made shards left out)."""
        return self.model_dump(exclude_none=True)


class WindowSource(IterableDataset):
    """Reads the rank's batches from a given start position on; picklable for DataLoader workers."""

    def __init__(
        self,
        files: list[Path],
        row_groups: list[tuple[int, int, int]],
        seq_len: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        buffer_row_groups: int,
    ):
        self.files = files
        self.row_groups = row_groups  # (file index, row group index, rows), in stream order
        self.num_windows = sum(rows for _, _, rows in row_groups)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.buffer_row_groups = seed, shuffle, buffer_row_groups
        self.start = 0
        self._bounds_epoch: int | None = None
        self._bounds = np.empty(0, dtype=np.int64)
        self._chunk_key: tuple[int, int] | None = None
        self._chunk = np.empty((0, seq_len + 1))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        batch, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        while True:
            yield self.batch(batch)
            batch += step

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's `index`-th batch after `self.start`: inputs and next-token targets, (B, T) each."""
        first = self.start + index * self.world_size * self.batch_size + self.rank * self.batch_size
        windows = torch.from_numpy(self.windows(first, self.batch_size).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def windows(self, position: int, count: int) -> np.ndarray:
        """The windows at global positions [position, position + count), (count, seq_len + 1)."""
        parts = []
        while count:
            epoch, offset = divmod(position, self.num_windows)
            bounds = self.chunk_bounds(epoch)
            chunk = int(np.searchsorted(bounds, offset, side="right")) - 1
            take = min(count, int(bounds[chunk + 1]) - offset)
            start = offset - int(bounds[chunk])
            parts.append(self.chunk(epoch, chunk)[start : start + take])
            position, count = position + take, count - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def row_group_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.row_groups))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.row_groups))

    def chunk_bounds(self, epoch: int) -> np.ndarray:
        """Offsets in the epoch where each chunk starts, and the epoch's end (the last epoch's are kept)."""
        if self._bounds_epoch != epoch:
            rows = np.array([self.row_groups[g][2] for g in self.row_group_order(epoch)])
            chunk_rows = np.add.reduceat(rows, np.arange(0, len(rows), self.buffer_row_groups))
            self._bounds_epoch, self._bounds = epoch, np.concatenate([[0], np.cumsum(chunk_rows)])
        return self._bounds

    def chunk(self, epoch: int, chunk: int) -> np.ndarray:
        """A chunk's windows in their shuffled order; the one most recently used is kept."""
        if self._chunk_key != (epoch, chunk):
            order = self.row_group_order(epoch)[chunk * self.buffer_row_groups : (chunk + 1) * self.buffer_row_groups]
            opened: dict[int, pq.ParquetFile] = {}
            parts = []
            for index in order:
                file, group, _ = self.row_groups[index]
                if file not in opened:
                    opened[file] = pq.ParquetFile(self.files[file])
                column = opened[file].read_row_group(group, columns=["tokens"]).column(0).combine_chunks()
                parts.append(column.flatten().to_numpy().reshape(-1, self.seq_len + 1))
            windows = np.concatenate(parts)
            if self.shuffle:
                windows = windows[np.random.default_rng([self.seed, epoch, chunk]).permutation(len(windows))]
            self._chunk_key, self._chunk = (epoch, chunk), windows
        return self._chunk


class WindowLoader:
    """One rank's stream of (inputs, targets) batches from `split` of the shards behind `manifest`.

    Implements the engine's `Batches` interface (see model.train): an endless iterator
    (epochs roll over), `state_dict()` / `load_state_dict()` holding the global position.
    Each `iter()` starts at the loaded position (0 at first), so iterating a validation
    loader again gives the same batches. With `shuffle=False` the windows come in stream
    order, for validation.
    """

    def __init__(
        self,
        manifest: Path | str,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        workers: int = 0,
        buffer_row_groups: int = 64,
    ):
        manifest = Path(manifest)
        info = ShardManifest.read(manifest)
        entries = [entry.model_dump() for entry in info.split_files(split)]
        verify_files(manifest.parent, entries)
        files = [inside(manifest.parent, entry["path"]) for entry in entries]
        row_groups = []
        for i, path in enumerate(files):
            metadata = pq.ParquetFile(path).metadata
            row_groups += [(i, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups)]
        self.seq_len, self.vocab_size = info.seq_len, info.vocab_size
        self.batch_size, self.world_size, self.workers = batch_size, world_size, workers
        self.source = WindowSource(
            files, row_groups, self.seq_len, batch_size, rank, world_size, seed, shuffle, buffer_row_groups
        )
        if self.source.num_windows < batch_size * world_size:
            raise UserError(
                f"{manifest}: split {split!r} has {self.source.num_windows} windows, fewer than one batch "
                f"of {batch_size} x {world_size} ranks"
            )
        self.start = self.position = 0

    @property
    def num_windows(self) -> int:
        return self.source.num_windows

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self.source.start = self.start
        batches = (
            iter(self.source)
            if self.workers == 0
            else iter(
                # Its own generator: seeding the workers must not draw from the global RNG (dropout).
                DataLoader(
                    self.source,
                    batch_size=None,
                    num_workers=self.workers,
                    prefetch_factor=4,
                    generator=torch.Generator(),
                )
            )
        )
        for count, batch in enumerate(batches, start=1):
            self.position = start + count * self.world_size * self.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The global position after the last batch handed out (by every rank)."""
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The next `iter()` starts at this position."""
        self.start = self.position = int(state["position"])
