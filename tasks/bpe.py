"""Stage 2, bpe: corpus -> a byte-level BPE tokenizer (GPT-2's scheme, HF `tokenizers`).

The initial alphabet is all 256 bytes, so every string round-trips exactly; the special
tokens `<|endoftext|>`, `<|pad|>`, `<|sep|>` get the fixed ids 0, 1, 2. The tokenizer is
trained on the train split only, fed in batches from the corpus Parquet file, then
checked on the val split: bytes per token, and that every val document decodes back to
itself. A train split larger than `bpe.max_train_bytes` is sampled, whole documents chosen
by a hash of their id (tasks/bpe_sample.py); the default cap holds the standard library
many times over.

Pre-tokens (the words BPE never merges across) are at most `bpe.max_pretoken_bytes` long:
a longer one (a line of one repeated character, a DNA string, a minified or base64 blob)
is cut into pieces of that many bytes by a step of the pre-tokenizer itself, saved in
tokenizer.json, so training, sharding, evaluation, generation and the Hugging Face export
cut alike. BPE training slows down with the square of a word's length; the bound keeps it
linear. The default is above the longest pre-token of the Python standard library (96
bytes), so ordinary text encodes exactly as without the bound. The trainer runs in a child
process (tasks/bpe_trainer.py) so that Ctrl-C and SIGTERM stop it.

With `model.init_from` the stage trains nothing: it records the pretrained model's own
tokenizer (`<|pad|>` and `<|sep|>` added when missing) and the model as `init/`, the
checkpoint pretraining starts from (`import_pretrained`).

Output `<workspace>/bpe/<fingerprint>/tokenizer.json`. Load it with `load_tokenizer`,
which also makes special-token strings that occur in text encode as plain text (a
document containing "<|endoftext|>" must not end early); that setting is not stored in
tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from model.checkpoint import (
    CONFIG,
    TOKENIZER,
    TOKENS,
    WEIGHTS,
    CheckpointTokens,
    attach_tokenizer,
    save_model_directory,
)
from model.special_tokens import SPECIAL_TOKENS
from tasks.bpe_trainer import train_in_child
from tasks.core.progress import step_progress
from tasks.core.stage_state import finished
from tasks.core.workspace import StageDir, StageOutput, atomic_path, fingerprint, sha256_file
from tasks.ingest import IngestOutput, read_corpus
from tasks.models.sources import open_model

FORMAT_VERSION = 2  # 2: the pre-token bound is a pre-tokenizer step in tokenizer.json
TOKENIZER_FILE = "tokenizer.json"
INIT_DIR = "init"  # with model.init_from: the pretrained model pretraining starts from
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
# Measured (bench/prepare.py): training and encoding a 60 MB line of one character take
# about as long at 128 to 4096; 256 is well above the standard library's longest pre-token.
MAX_PRETOKEN_BYTES = 256
# BPE's merges come from the most frequent pairs, which a sample of a few GB already ranks as
# the whole corpus does, while the trainer's time and memory keep growing with every byte.
# Unmeasured here at scale (a later session prints bytes per token on val for a sample
# against the whole split); far above the standard library (tens of MB), which stays whole.
MAX_TRAIN_BYTES = 2_000_000_000


class BPEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, le=2**32, description="the number of token ids, special tokens included")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    max_pretoken_bytes: int | None = Field(
        MAX_PRETOKEN_BYTES, ge=1, description="longer pre-tokens are cut into pieces this long; null: no bound"
    )
    max_train_bytes: int | None = Field(
        MAX_TRAIN_BYTES, ge=1, description="train on a sample of whole documents of at most this many bytes; null: all"
    )

    @field_validator("vocab_size")
    @classmethod
    def _holds_the_alphabet(cls, vocab_size: int) -> int:
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"{vocab_size} is smaller than the 256-byte alphabet plus {len(SPECIAL_TOKENS)} "
                f"special tokens: use at least {MIN_VOCAB_SIZE}"
            )
        return vocab_size


class BPEOutput(StageOutput):
    tokenizer: Path  # tokenizer.json
    init_checkpoint: Path | None = None  # with model.init_from: the pretrained model, a checkpoint directory


def new_tokenizer(max_pretoken_bytes: int | None = MAX_PRETOKEN_BYTES) -> Tokenizer:
    """An untrained byte-level BPE tokenizer: GPT-2's pre-tokenizer regex, pre-tokens cut
    to at most `max_pretoken_bytes` (None: uncut), no normalizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = bounded_byte_level(max_pretoken_bytes)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def bounded_byte_level(max_pretoken_bytes: int | None) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level pre-tokenizer, then pre-tokens longer than `max_pretoken_bytes` cut
    into pieces of that many bytes (the last one shorter). After the byte-level step every
    character stands for one byte and none is a newline, so `.{N}` matches N bytes."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if max_pretoken_bytes is None:
        return byte_level
    cut = pre_tokenizers.Split(Regex(f".{{{max_pretoken_bytes}}}"), behavior="isolated")
    return pre_tokenizers.Sequence([byte_level, cut])


def load_tokenizer(path: Path) -> Tokenizer:
    """A trained tokenizer, with special-token strings in text encoded as plain text."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 byte length of each token as the tokenizer decodes it; special tokens 0.

    A byte-level BPE token's string spells one byte per character (GPT-2's byte-to-unicode
    alphabet), so its length is its byte count, even for a token that is only part of a
    multi-byte character and would not decode alone.
    """
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        lengths[token_id] = len(token) if byte_level else len(tokenizer.decode([token_id]).encode("utf-8"))
    return lengths


def train(config: BPEConfig, corpus: IngestOutput, destination: Path) -> dict[str, int]:
    """Train on the corpus's train split, or its sample (in a child process: see
    tasks/bpe_trainer.py), and save the tokenizer to `destination`; the documents and bytes fed."""
    settings = {
        "vocab_size": config.vocab_size,
        "min_frequency": config.min_frequency,
        "special_tokens": SPECIAL_TOKENS,  # first, so they get ids 0, 1, 2
    }
    train_bytes = corpus.report["bytes_train"]
    sample = {"max_train_bytes": config.max_train_bytes, "train_bytes": train_bytes}
    share = min(1.0, (config.max_train_bytes or train_bytes) / max(train_bytes, 1))
    with step_progress("bpe: train tokenizer", round(corpus.report["documents_train"] * share)) as progress:
        tokenizer = new_tokenizer(config.max_pretoken_bytes)
        return train_in_child(tokenizer, settings, sample, corpus.corpus, destination, progress)


def check_on_val(tokenizer: Tokenizer, corpus: Path) -> dict[str, Any]:
    """Bytes per token on the val split, and which val documents fail to round-trip."""
    n_bytes = n_tokens = documents = 0
    failures: list[str] = []
    for batch in read_corpus(corpus, split="val"):
        texts = batch.column("text").to_pylist()
        ids = [encoding.ids for encoding in tokenizer.encode_batch_fast(texts)]
        decoded = tokenizer.decode_batch(ids, skip_special_tokens=False)
        for doc_id, text, tokens, back in zip(batch.column("id").to_pylist(), texts, ids, decoded):
            n_bytes += len(text.encode())
            n_tokens += len(tokens)
            documents += 1
            if back != text:
                failures.append(doc_id)
    return {
        "val_documents": documents,
        "val_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
        "val_roundtrip_failures": len(failures),
        "val_roundtrip_first_failure": failures[0] if failures else None,
    }


def bpe_fingerprint(config: BPEConfig, corpus_fingerprint: str) -> str:
    # The sample's cap enters only when set away from its default, so that the fingerprints
    # of the tokenizers trained before it existed (on splits within the default cap) hold.
    at_default = {"max_train_bytes"} if config.max_train_bytes == MAX_TRAIN_BYTES else set()
    settings = config.model_dump(mode="json", exclude=at_default)
    return fingerprint("bpe", settings, {"corpus": corpus_fingerprint}, FORMAT_VERSION)


def run_bpe(config: BPEConfig, corpus: IngestOutput, workspace: Path | str, init_from: str | None = None) -> BPEOutput:
    """Train `<workspace>/bpe/<fingerprint>/tokenizer.json` on the train split (or reuse it);
    with `init_from` (model.init_from), take the pretrained model's tokenizer instead."""
    if init_from is not None:
        return import_pretrained(init_from, corpus, workspace)
    stage = StageDir(workspace, "bpe", bpe_fingerprint(config, corpus.fingerprint))

    def build(directory: Path) -> dict[str, Any]:
        path = directory / TOKENIZER_FILE
        with atomic_path(path) as tmp:
            fed = train(config, corpus, tmp)
        # The val check runs on the tokenizer as every later stage loads it.
        tokenizer = load_tokenizer(path)
        report = {"vocab_size": tokenizer.get_vocab_size(), **check_on_val(tokenizer, corpus.corpus)}
        if fed["bytes"] < corpus.report["bytes_train"]:  # sampled (a split within the cap reports as before)
            report |= {"train_sample_documents": fed["documents"], "train_sample_bytes": fed["bytes"]}
        return {
            "format": FORMAT_VERSION,
            "fingerprint": stage.fingerprint,
            "inputs": {"corpus": corpus.fingerprint},
            "files": [{"path": TOKENIZER_FILE, "sha256": sha256_file(path)}],
            "report": report,
        }

    return BPEOutput.build_once(stage, build, tokenizer=TOKENIZER_FILE)


def import_pretrained(init_from: str, corpus: IngestOutput, workspace: Path | str) -> BPEOutput:
    """Record the tokenizer of the pretrained model `init_from` (no training), and the model
    itself as `init/`, the checkpoint pretraining starts from. The fingerprint holds the model
    by content (its digest), so the shards and pretraining follow a changed model, not a name."""
    source = open_model(init_from)
    settings = {"init_from": source.digest}
    stage = StageDir(workspace, "bpe", fingerprint("bpe", settings, {"corpus": corpus.fingerprint}, FORMAT_VERSION))

    def build(directory: Path) -> dict[str, Any]:
        path = directory / TOKENIZER_FILE
        with atomic_path(path) as tmp:
            source.tokenizer.save(str(tmp))
        init = save_model_directory(source.model, directory / INIT_DIR)
        attach_tokenizer(init, path, CheckpointTokens(special_ids=source.special, prompt_format="document"))
        tokenizer = load_tokenizer(path)
        report = {
            "vocab_size": tokenizer.get_vocab_size(),
            "trained": False,
            "init_from": init_from,
            **{f"init_{key}": value for key, value in source.lineage.items()},
            **check_on_val(tokenizer, corpus.corpus),
        }
        listed = [TOKENIZER_FILE, *(f"{INIT_DIR}/{name}" for name in (WEIGHTS, CONFIG, TOKENIZER, TOKENS))]
        return {
            "format": FORMAT_VERSION,
            "fingerprint": stage.fingerprint,
            "inputs": {"corpus": corpus.fingerprint, "init_from": source.digest},
            "files": [{"path": name, "sha256": sha256_file(directory / name)} for name in listed],
            "report": report,
        }

    return BPEOutput.build_once(stage, build, tokenizer=TOKENIZER_FILE, init_checkpoint=INIT_DIR)


@task(name="train-tokenizer", cache_policy=NO_CACHE)
def train_tokenizer_task(
    config: BPEConfig, corpus: IngestOutput, workspace: Path | str, init_from: str | None = None
) -> BPEOutput:
    """Prefect task over `run_bpe`; the stage directory's manifest does the caching."""
    return finished(run_bpe(config, corpus, workspace, init_from))
