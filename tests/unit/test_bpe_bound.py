"""The pre-token bound (`bpe.max_pretoken_bytes`): part of the saved tokenizer, it cuts long
pre-tokens exactly where a hand cut would, ordinary code encodes as without it, and a
document of one repeated character no longer stalls the tokenizer and shard stages."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from tasks.bpe import BPEConfig, load_tokenizer, new_tokenizer, run_bpe
from tasks.ingest import IngestConfig, run_ingest
from tasks.ingest_filters import FilterConfig
from tasks.shard import ShardConfig, run_shard


def prepare(workspace: Path, source: Path, bound: int | None, vocab_size: int = 1024, **ingest):
    corpus = run_ingest(IngestConfig(source=str(source), val_fraction=0.2, **ingest), workspace)
    tokenizer = run_bpe(BPEConfig(vocab_size=vocab_size, max_pretoken_bytes=bound), corpus, workspace)
    shards = run_shard(ShardConfig(seq_len=64), corpus, tokenizer, workspace)
    return tokenizer, shards


def test_the_bound_is_a_pre_tokenizer_step_saved_in_tokenizer_json(tmp_path):
    tokenizer = new_tokenizer(8)
    tokenizer.save(str(tmp_path / "t.json"))
    steps = json.loads((tmp_path / "t.json").read_text())["pre_tokenizer"]["pretokenizers"]
    assert [step["type"] for step in steps] == ["ByteLevel", "Split"]
    # 20 bytes of "a" are one GPT-2 word; cut by hand: 8 + 8 + 4 ("Ġ" stands for the space byte)
    words = [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str("x " + "a" * 20 + " é" * 5)]
    assert words == ["x", "Ġ" + "a" * 7, "a" * 8, "a" * 5, *["ĠÃ©"] * 5]
    assert [word for word, _ in new_tokenizer(None).pre_tokenizer.pre_tokenize_str("a" * 20)] == ["a" * 20]


@pytest.mark.slow
def test_standard_library_shards_are_byte_identical_with_the_bound_on_and_off(tmp_path):
    """A sample of the standard library (the email and json packages: 400 KB); its longest
    pre-token is far below the default bound, so the tokenizer and the shards must not change."""
    source = tmp_path / "src"
    for package in ("email", "json"):
        shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / package, source / package)
    on_tokenizer, on = prepare(tmp_path / "on", source, BPEConfig().max_pretoken_bytes)
    off_tokenizer, off = prepare(tmp_path / "off", source, None)
    model = lambda output: json.loads(output.tokenizer.read_text())["model"]  # noqa: E731
    assert model(on_tokenizer) == model(off_tokenizer)
    on_files = json.loads(on.manifest.read_text())["files"]
    assert on_files == json.loads(off.manifest.read_text())["files"]
    assert len(on_files) >= 2


def test_a_document_of_one_repeated_character_is_cut_into_bounded_pieces(tmp_path):
    """A 1 MB line of one character, unbounded, is a 1 MB word: BPE training on it takes
    minutes (time grows with the square of the length: 3.4 s at 100 KB, measured). Bounded,
    every pre-token, and so every token, is at most 256 bytes."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "run.txt").write_text("a" * 1_000_000)
    for index in range(4):
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / f"{('abc', 'bisect', 'heapq', 'shlex')[index]}.py", source)
    tokenizer, shards = prepare(tmp_path / "ws", source, 256, vocab_size=400, filters=FilterConfig.off(), seed=3)
    bpe = load_tokenizer(tokenizer.tokenizer)
    assert max(len(token) for token in bpe.get_vocab()) <= 256
    run = bpe.encode("a" * 1000).ids
    by_hand = [token for piece in ("a" * 256, "a" * 256, "a" * 256, "a" * 232) for token in bpe.encode(piece).ids]
    assert run == by_hand
    assert bpe.decode(run) == "a" * 1000
    assert shards.report["train_stream_tokens"] + shards.report["val_stream_tokens"] > 0
