"""The shard stage: window arithmetic, the token stream, file layout, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
from model.special_tokens import special_ids
from tasks.bpe import BPEConfig, load_tokenizer, run_bpe
from tasks.core.workspace import StageDir
from tasks.ingest import IngestConfig, run_ingest, split_of
from tasks.shard import ShardConfig, encode_documents, pieces, run_shard, token_dtype, write_split

STDLIB_FILES = ["abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "shlex.py", "textwrap.py"]


def read_windows(directory: Path, files: list[dict]) -> np.ndarray:
    """All windows of `files`, in order, as one (rows, seq_len + 1) array."""
    tables = [pq.read_table(directory / entry["path"]) for entry in files]
    return np.concatenate([np.stack(t.column("tokens").to_numpy(zero_copy_only=False)) for t in tables])


def write_stream(
    tmp_path: Path, stream: np.ndarray, seq_len: int, stride: int, shard_bytes: int = 8192
) -> tuple[np.ndarray, list[dict]]:
    """Write `stream` (fed in uneven chunks) with the stage's writer; read the windows back."""
    rng = np.random.default_rng(len(stream))
    cuts = np.sort(rng.choice(np.arange(1, len(stream)), size=min(20, len(stream) - 1), replace=False))
    files = write_split(np.split(stream, cuts), tmp_path, "train", seq_len, stride, stream.dtype, shard_bytes)
    return read_windows(tmp_path, files), files


@pytest.mark.parametrize("length", [5000, 5001, 5017, 33])
def test_with_stride_equal_to_seq_len_every_token_after_the_first_is_a_target_once(tmp_path, length):
    seq_len = 16
    stream = np.arange(length, dtype=np.uint16)  # a token's value is its position
    windows, files = write_stream(tmp_path, stream, seq_len, seq_len)
    windows_expected = (length - 1) // seq_len  # each window has seq_len targets
    assert windows.shape == (windows_expected, seq_len + 1)
    targets = windows[:, 1:].reshape(-1)
    assert targets.tolist() == list(range(1, windows_expected * seq_len + 1))  # each once, in order
    assert windows[0, 0] == 0
    assert sum(entry["rows"] for entry in files) == windows_expected


@pytest.mark.parametrize(("seq_len", "stride"), [(16, 5), (16, 1), (7, 6)])
def test_with_a_smaller_stride_window_i_starts_at_token_i_times_stride(tmp_path, seq_len, stride):
    stream = np.arange(3000, dtype=np.uint16)
    windows, _ = write_stream(tmp_path, stream, seq_len, stride)
    starts = [i for i in range(len(stream)) if i % stride == 0 and i + seq_len + 1 <= len(stream)]
    assert windows.tolist() == [list(range(start, start + seq_len + 1)) for start in starts]


def test_files_respect_shard_bytes_and_row_groups_are_uniform(tmp_path):
    stream = np.random.default_rng(0).integers(0, 8192, 60_000).astype(np.uint16)
    windows, files = write_stream(tmp_path, stream, seq_len=32, stride=32, shard_bytes=16384)
    assert len(files) > 3
    group_rows = []
    for entry in files:
        path = tmp_path / entry["path"]
        metadata = pq.ParquetFile(path).metadata
        assert path.stat().st_size == entry["bytes"] <= 16384
        assert entry["tokens"] == entry["rows"] * 33 == metadata.num_rows * 33
        assert entry["row_groups"] == metadata.num_row_groups
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert metadata.row_group(0).column(0).compression == "ZSTD"
        group_rows += [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    # A group is at most shard_bytes / 8 = 2048 bytes uncompressed: 31 windows of 66 bytes.
    assert group_rows[:-1] == [31] * (len(group_rows) - 1) and 0 < group_rows[-1] <= 31
    assert windows.tolist() == [stream[i * 32 : i * 32 + 33].tolist() for i in range(len(windows))]


def test_token_ids_above_65535_round_trip_as_uint32(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    stream = np.arange(65_000, 66_000, dtype=token_dtype(70_000))
    windows, _ = write_stream(tmp_path, stream, seq_len=9, stride=9)
    column_type = pq.read_schema(tmp_path / "train-00000.parquet").field("tokens").type
    assert str(column_type.value_type) == "uint32" and column_type.list_size == 10
    assert windows.max() == 65_999 > 65_535
    assert windows.tolist() == [stream[i * 9 : i * 9 + 10].tolist() for i in range(len(windows))]


# -- the stage on a micro corpus ------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A micro corpus (a few stdlib modules) and a tokenizer of 400 ids trained on it."""
    root = tmp_path_factory.mktemp("shard")
    source = root / "src"
    source.mkdir()
    for name in STDLIB_FILES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, source / name)
    seed = next(s for s in range(100) if 0 < [split_of(n, 0.3, s) for n in STDLIB_FILES].count("val") < 3)
    corpus = run_ingest(IngestConfig(source=str(source), val_fraction=0.3, seed=seed), root / "ws")
    tokenizer = run_bpe(BPEConfig(vocab_size=400), corpus, root / "ws")
    return corpus, tokenizer


def test_the_stream_is_each_document_followed_by_endoftext(tmp_path, prepared):
    corpus, tokenizer = prepared
    output = run_shard(ShardConfig(seq_len=32, shard_bytes=16384), corpus, tokenizer, tmp_path)
    manifest = json.loads(output.manifest.read_text())
    bpe = load_tokenizer(tokenizer.tokenizer)
    texts = pq.read_table(corpus.corpus).to_pylist()
    eos = special_ids(bpe).eos
    for split in ("train", "val"):
        expected = [t for row in texts if row["split"] == split for t in [*bpe.encode(row["text"]).ids, eos]]
        files = [entry for entry in manifest["files"] if entry["split"] == split]
        windows = read_windows(output.path, files)
        stream = [*windows[0, :1].tolist(), *windows[:, 1:].reshape(-1).tolist()]  # windows share one token
        totals = manifest["totals"][split]
        assert stream == expected[: len(stream)]
        assert totals["stream_tokens"] == len(expected)
        assert totals["dropped_tokens"] == len(expected) - len(stream) < 32
        assert totals["rows"] == len(windows) and totals["tokens"] == len(windows) * 33
        assert totals["documents"] == sum(row["split"] == split for row in texts)
    assert [entry["split"] for entry in manifest["files"]] == sorted(e["split"] for e in manifest["files"])
    assert (manifest["seq_len"], manifest["stride"], manifest["dtype"], manifest["eos_id"]) == (32, 32, "uint16", 0)
    assert manifest["vocab_size"] == tokenizer.report["vocab_size"]
    assert manifest["tokenizer_sha256"] == hashlib.sha256(tokenizer.tokenizer.read_bytes()).hexdigest()
    assert manifest["inputs"] == {"corpus": corpus.fingerprint, "tokenizer": tokenizer.fingerprint}


@pytest.mark.parametrize("piece_chars", [16, 200])
def test_documents_encoded_in_pieces_have_the_tokens_of_the_whole(prepared, monkeypatch, piece_chars):
    corpus, tokenizer = prepared
    monkeypatch.setattr("tasks.shard.pieces.__defaults__", (piece_chars,))
    bpe = load_tokenizer(tokenizer.tokenizer)
    tricky = "x = 1\n\n    y\r\nz \n\tw\n 's\n's\n<|endoftext|>\n\u00e9\n\u3000a\nb\n" * 20
    texts = [*pq.read_table(corpus.corpus).column("text").to_pylist(), tricky]
    assert all("".join(pieces(text)) == text for text in texts)
    assert max(len(piece) for text in texts for piece in pieces(text)) < 10 * piece_chars  # cut, mostly
    assert encode_documents(bpe, texts) == [bpe.encode(text).ids for text in texts]


def test_a_flipped_byte_in_a_shard_is_named_and_nothing_is_deleted(tmp_path, prepared):
    corpus, tokenizer = prepared
    config = ShardConfig(seq_len=32, shard_bytes=16384)
    output = run_shard(config, corpus, tokenizer, tmp_path)
    shard = output.path / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train-00001\.parquet: contents no longer match the sha256"):
        run_shard(config, corpus, tokenizer, tmp_path)
    assert shard.exists() and output.manifest.exists()


def test_a_seq_len_longer_than_a_split_is_named_and_earlier_stages_stay(tmp_path, prepared):
    corpus, tokenizer = prepared
    with pytest.raises(UserError, match=r"the val split has \d+ tokens, fewer than shard.seq_len \+ 1 = 50001"):
        run_shard(ShardConfig(seq_len=50_000), corpus, tokenizer, tmp_path)
    assert not list((tmp_path / "shard").rglob("manifest.json"))
    for done in (corpus, tokenizer):  # the finished stages are intact
        StageDir(done.path.parents[1], done.path.parent.name, done.fingerprint).read_manifest(verify=True)


def test_shard_bytes_too_small_for_one_window_fails_before_tokenizing(tmp_path, prepared, monkeypatch):
    corpus, tokenizer = prepared
    monkeypatch.setattr("tasks.shard.load_tokenizer", lambda path: pytest.fail("tokenized"))
    with pytest.raises(
        UserError, match=r"shard.shard_bytes=4096 is too small for one window of shard.seq_len \+ 1 = 2049"
    ):
        run_shard(ShardConfig(seq_len=2048, shard_bytes=4096), corpus, tokenizer, tmp_path)


def test_stride_larger_than_seq_len_is_refused():
    with pytest.raises(ValueError, match=r"stride \(9\) must be at most seq_len \(8\)"):
        ShardConfig(seq_len=8, stride=9)
    assert ShardConfig(seq_len=8).stride == 8
