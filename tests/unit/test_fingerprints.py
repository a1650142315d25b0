"""Stage fingerprints and the shard manifest's bytes, pinned as recorded from the code.

A stage directory is named by its fingerprint, so a refactoring that changes one silently
orphans every existing workspace; a changed manifest byte breaks the stages that verify it.
The values below were recorded once; a change to what a stage computes bumps that stage's
FORMAT_VERSION and updates them here, on purpose.
"""

from __future__ import annotations

import hashlib
import os

from model.config import ModelConfig
from tasks.bpe import BPEConfig, run_bpe
from tasks.evaluate import EvaluateConfig, evaluate_fingerprint, evaluate_inputs
from tasks.finetune import FinetuneConfig, finetune_fingerprint, finetune_inputs
from tasks.ingest import IngestConfig, run_ingest
from tasks.pretrain import PretrainConfig, pretrain_fingerprint
from tasks.shard import ShardConfig, run_shard

FILE_TIME_NS = 1_700_000_000_000_000_000  # every source file's mtime: the ingest fingerprint reads it
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def write_micro_source(root) -> None:
    """24 small deterministic documents under `root/src`, all with the same file times."""
    (root / "src").mkdir()
    for i in range(24):
        lines = [f"def f{i}_{j}(x):\n    return x + {i * j}  # {WORDS[(i + j) % len(WORDS)]}\n" for j in range(12)]
        path = root / "src" / f"doc{i:02d}.py"
        path.write_text("".join(lines))
        os.utime(path, ns=(FILE_TIME_NS, FILE_TIME_NS))


def manifest_sha256(stage_dir) -> str:
    return hashlib.sha256((stage_dir / "manifest.json").read_bytes()).hexdigest()


def test_data_stage_fingerprints_and_manifest_bytes_are_unchanged(tmp_path, monkeypatch):
    write_micro_source(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative source: the config (and so the fingerprint) names no tmp path
    corpus = run_ingest(IngestConfig(source="src", val_fraction=0.3), "workspace")
    tokenizer = run_bpe(BPEConfig(vocab_size=300, min_frequency=2), corpus, "workspace")
    shards = run_shard(ShardConfig(seq_len=16, shard_bytes=16384), corpus, tokenizer, "workspace")
    pretrain = pretrain_fingerprint(
        PretrainConfig(max_steps=10), ModelConfig(preset="tiny", n_layer=1), shards.fingerprint
    )

    # Ingest format 2 (filters, near-dedup, unreadable files) and bpe format 2 (the pre-token bound in
    # tokenizer.json) changed every data fingerprint; the corpus, merges and shard files stayed byte for byte.
    # Ingest format 3 (chunks; near-duplicate clusters keep their earliest document) changed them again, and
    # the ingest manifest (its format); corpus.parquet stayed byte for byte (sha256 b8a21620...).
    assert (corpus.fingerprint, tokenizer.fingerprint, shards.fingerprint, pretrain) == (
        "64a3e29d39d5f65e",
        "8c5ce1b4551d8ffb",
        "9c24877bc861bbb7",
        "6705135c13d2025f",  # pretrain FORMAT_VERSION 4 (self-contained checkpoints), val_windows replaced eval_batches
    )
    manifests = {stage.path.parent.name: manifest_sha256(stage.path) for stage in (corpus, tokenizer, shards)}
    assert manifests == {
        "ingest": "b699d3272de357ee88e679735842758e66ce9337145013b232fada2dcf74d873",
        "bpe": "0483e2805264b5806eb9ebfa211faeee47088acc6f6c55f9f293d224bbf27b6f",
        "shard": "1f240b2671ba7a61a2e9d9f6ddec5e9eff7541eb0f865627c0be345f2502f68b",
    }


def test_a_run_only_setting_leaves_the_pretrain_fingerprint_alone():
    config = PretrainConfig(max_steps=10)
    run_differently = config.model_copy(
        update={"resume": False, "nproc_per_node": 2, "checkpoint_every": 5, "checkpoint_minutes": 1}
    )
    assert pretrain_fingerprint(run_differently, ModelConfig(), "0" * 16) == pretrain_fingerprint(
        config, ModelConfig(), "0" * 16
    )


def test_evaluate_and_finetune_fingerprints_of_fixed_inputs_are_unchanged():
    evaluate = evaluate_fingerprint(EvaluateConfig(), evaluate_inputs("a" * 64, "b" * 64, "c" * 16, "d" * 64))
    finetune = finetune_fingerprint(FinetuneConfig(), finetune_inputs("a" * 64, "b" * 64, "e" * 64), block_size=64)
    finetune_file = finetune_fingerprint(
        FinetuneConfig(task=None, path="pairs.jsonl", eval_every=5, start_from="models:/m@champion"),
        finetune_inputs("a" * 64, "b" * 64, "e" * 64),
        block_size=64,
    )
    # evaluate: max_windows defaults to model.scoring.VAL_WINDOWS (no benchmarks: none enter it); finetune
    # FORMAT_VERSION 5: the document-primed row passes over an example too long for the row (4: that row)
    assert (evaluate, finetune, finetune_file) == ("8d1ec3225ef32281", "636a80455440c671", "4443f9081c6a91cf")
