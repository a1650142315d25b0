"""The bpe stage: a byte-level BPE that round-trips everything, trained on the train split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers, trainers

from flows.pipeline_config import load_config
from model.errors import UserError
from model.special_tokens import EOS, PAD, SEP, SPECIAL_TOKENS, special_ids
from support.corpus import write_corpus
from tasks.bpe import MAX_TRAIN_BYTES, BPEConfig, bpe_fingerprint, load_tokenizer, new_tokenizer, run_bpe
from tasks.bpe_sample import train_batches
from tasks.ingest import IngestConfig, run_ingest, split_of

VAL_FRACTION = 0.3
TRAIN_LINE = "quokka = {i}  # the quokka smiles\nprint(quokka, 'café ✓')\n"
VAL_LINE = "zyzzyva = {i}  # the zyzzyva hides\nprint(zyzzyva)\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained on a micro corpus whose val documents alone say 'zyzzyva'."""
    root = tmp_path_factory.mktemp("bpe")
    lines = []
    for line_number in range(1, 61):
        template = VAL_LINE if split_of(f"c.jsonl:{line_number}", VAL_FRACTION, 0) == "val" else TRAIN_LINE
        lines.append(json.dumps({"text": "".join(template.format(i=i) for i in range(line_number, line_number + 8))}))
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    # Neighbouring lines share 7 of their 8 statements: near-dedup (a cluster keeps its earliest
    # document) would drop most of them, and every line is wanted here.
    config = IngestConfig(source=str(root / "c.jsonl"), val_fraction=VAL_FRACTION, filters={"near_dedup": False})
    corpus = run_ingest(config, root / "ws")
    output = run_bpe(BPEConfig(vocab_size=400, min_frequency=2), corpus, root / "ws")
    val_texts = [json.loads(line)["text"] for line in lines if "zyzzyva" in line]
    return corpus, output, load_tokenizer(output.tokenizer), val_texts


def test_special_tokens_have_fixed_ids_and_all_256_bytes_are_tokens(trained):
    tokenizer = trained[2]
    assert [tokenizer.token_to_id(t) for t in (EOS, PAD, SEP)] == [
        0,
        1,
        2,
    ]  # a trained tokenizer has them first (DESIGN's contract)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(tokenizer.get_vocab())
    assert len(pre_tokenizers.ByteLevel.alphabet()) == 256


def test_trained_on_the_train_split_only(trained):
    tokenizer = trained[2]
    assert len(tokenizer.encode(" quokka").ids) == 1  # frequent in train: merged into one token
    assert len(tokenizer.encode(" zyzzyva").ids) > 2  # frequent too, but only in val: not learned


def test_report_measures_the_val_split(trained):
    corpus, output, tokenizer, val_texts = trained
    n_bytes = sum(len(t.encode()) for t in val_texts)
    n_tokens = sum(len(tokenizer.encode(t).ids) for t in val_texts)
    assert output.report["vocab_size"] == tokenizer.get_vocab_size() <= 400  # a micro corpus has fewer merges
    assert output.report["val_documents"] == len(val_texts) == corpus.report["documents_val"]
    assert output.report["val_bytes_per_token"] == pytest.approx(n_bytes / n_tokens, abs=1e-4)
    assert output.report["val_roundtrip_failures"] == 0


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_round_trips(trained, text):
    tokenizer = trained[2]
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_round_trip_as_ingest_leaves_them(trained, data):
    tokenizer = trained[2]
    text = data.decode("utf-8", "replace")  # what ingest makes of bytes that are not UTF-8
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False).encode() == text.encode()


def test_special_token_text_inside_a_document_is_plain_text(trained):
    tokenizer = trained[2]
    ids = tokenizer.encode(f"a{EOS}b{SEP}").ids
    special = special_ids(tokenizer)
    assert special.eos not in ids and special.sep not in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"a{EOS}b{SEP}"


def test_a_vocab_smaller_than_the_byte_alphabet_fails_at_load_time(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: t\nbpe: {vocab_size: 8192}\n")
    with pytest.raises(UserError, match=r"c.yaml: field 'bpe.vocab_size'.*at least 259"):
        load_config(config, ["bpe.vocab_size=258"])
    assert load_config(config, ["bpe.vocab_size=259"]).bpe.vocab_size == 259


def train_split_texts(corpus) -> list[str]:
    return [row["text"] for row in pq.read_table(corpus.corpus).to_pylist() if row["split"] == "train"]


def test_the_default_cap_trains_on_the_whole_split_as_the_trainer_alone_does(trained):
    corpus, output, tokenizer, _ = trained
    assert corpus.report["bytes_train"] < MAX_TRAIN_BYTES
    # The independent computation: `tokenizers`' trainer fed the whole train split directly.
    alone = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    alone.train_from_iterator([train_split_texts(corpus)], trainer)
    assert json.loads(tokenizer.to_str())["model"] == json.loads(alone.to_str())["model"]  # vocab and merges
    assert "train_sample_bytes" not in output.report


def write_sized_corpus(path: Path) -> Path:
    """300 distinct train documents of 40 to 400 bytes, and a few val ones."""
    documents = [(f"doc{i:03d}", f"document {i:03d} " + "x" * (28 + (i * 37) % 360), "train") for i in range(300)]
    documents += [(f"val{i}", f"held out {i} " * 10, "val") for i in range(5)]
    return write_corpus(path, documents)


def test_a_split_over_the_cap_is_a_deterministic_sample_of_whole_train_documents_within_it(tmp_path):
    corpus = write_sized_corpus(tmp_path / "corpus.parquet")
    rows = pq.read_table(corpus).to_pydict()
    train_texts = [text for text, split in zip(rows["text"], rows["split"]) if split == "train"]
    train_bytes = sum(len(text.encode()) for text in train_texts)
    cap = train_bytes // 4
    sample = [text for batch in train_batches(corpus, cap, train_bytes) for text in batch]
    assert sample == [text for batch in train_batches(corpus, cap, train_bytes) for text in batch]
    assert set(sample) <= set(train_texts)  # whole train documents, none of val
    assert sample == [text for text in train_texts if text in set(sample)]  # in corpus order
    assert 0.5 * cap < sum(len(text.encode()) for text in sample) <= cap
    # Spread over the corpus, not its first documents.
    positions = [train_texts.index(text) for text in sample]
    assert min(positions) < 30 and max(positions) > 200
    # Within the cap (or without one): the whole split, in the corpus's batches.
    for whole_cap in (train_bytes, None):
        assert [text for batch in train_batches(corpus, whole_cap, train_bytes) for text in batch] == train_texts


def test_the_cap_enters_the_fingerprint_only_away_from_its_default_and_the_report_when_it_samples(tmp_path):
    config = BPEConfig(vocab_size=300)
    explicit = config.model_copy(update={"max_train_bytes": MAX_TRAIN_BYTES})
    assert bpe_fingerprint(explicit, "c" * 16) == bpe_fingerprint(config, "c" * 16)
    assert bpe_fingerprint(config.model_copy(update={"max_train_bytes": None}), "c" * 16) != bpe_fingerprint(
        config, "c" * 16
    )
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": f"line {i} " * 30 + "\n"}) + "\n" for i in range(80)))
    corpus = run_ingest(IngestConfig(source=str(source), val_fraction=0.2), tmp_path / "ws")
    cap = corpus.report["bytes_train"] // 3
    output = run_bpe(config.model_copy(update={"max_train_bytes": cap}), corpus, tmp_path / "ws")
    assert 0 < output.report["train_sample_bytes"] <= cap
    assert 0 < output.report["train_sample_documents"] < corpus.report["documents_train"]
