"""Property-based tests: arbitrary input never escapes as anything but a clear user error.

- The config loader, fed arbitrary YAML files (random text, random bytes, and random
  mappings built from the config's own section and field names) and arbitrary `--set`
  overrides, either returns a valid config or raises `UserError`; an accepted config
  survives a dump-and-reload unchanged.
- The corpus reader, fed arbitrary bytes as .txt/.py/.jsonl/.json files, never raises:
  every file is read and counted (kept, skipped as binary, or counted as a record without
  text), and every kept document is valid UTF-8 without NUL, long enough, and unique.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.pipeline_config import PipelineConfig, load_config
from model.errors import UserError
from tasks.ingest import IngestConfig, local_files, write_corpus

EXAMPLES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Names the loader knows, so random documents reach field validation, not only "unknown field".
NAMES = [
    "name",
    "workspace",
    "ingest",
    "bpe",
    "shard",
    "model",
    "pretrain",
    "evaluate",
    "finetune",
    "register",
    "source",
    "min_chars",
    "val_fraction",
    "seed",
    "vocab_size",
    "min_frequency",
    "seq_len",
    "stride",
    "shard_bytes",
    "preset",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "max_steps",
    "batch_tokens",
    "lr",
    "warmup_steps",
    "checkpoint_every",
    "prompts",
    "max_new_tokens",
    "top_k",
    "task",
    "path",
    "gate_metric",
]
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=8))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["tiny", "gpt2", "cosine", "python-stdlib", "1e-3", "null", "../x", "/"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)
documents = st.one_of(
    st.dictionaries(keys, values, max_size=8).map(lambda d: yaml.safe_dump(d).encode()),
    st.fixed_dictionaries({"name": st.text(min_size=1, max_size=10)}, optional={n: values for n in NAMES[1:10]}).map(
        lambda d: yaml.safe_dump(d).encode()
    ),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
)
override_keys = st.lists(
    st.one_of(st.sampled_from(NAMES), st.text(alphabet=string.printable, max_size=6)), min_size=0, max_size=4
)
overrides = st.one_of(
    st.text(max_size=40),
    st.tuples(override_keys.map(".".join), st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(
        override_keys.map(".".join), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
)


def load(document: bytes, sets: list[str]) -> PipelineConfig | None:
    """The loaded config, or None when the loader refused it with a UserError."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(document)
        try:
            return load_config(path, sets)
        except UserError as e:
            assert str(e), "a UserError must say what is wrong"
            return None


@EXAMPLES
@given(document=documents)
def test_config_loader_accepts_or_names_the_problem(document):
    config = load(document, [])
    if config is not None:
        assert PipelineConfig.model_validate(config.model_dump(mode="json")) == config


@EXAMPLES
@given(sets=st.lists(overrides, max_size=3))
def test_config_overrides_accept_or_name_the_problem(sets):
    config = load(yaml.safe_dump({"name": "props", "bpe": {"vocab_size": 300}}).encode(), sets)
    if config is not None:
        assert PipelineConfig.model_validate(config.model_dump(mode="json")) == config


# --- the corpus reader --------------------------------------------------------------------

SUFFIXES = [".txt", ".py", ".jsonl", ".json"]
TEXTY = st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))
JSON_LINES = st.lists(
    st.one_of(
        st.text(max_size=60).map(lambda t: '{"text": ' + yaml.safe_dump(t, default_style='"').strip() + "}"),
        st.text(max_size=40),
    ),
    max_size=6,
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
contents = st.one_of(st.binary(max_size=400), TEXTY, JSON_LINES)
corpora = st.lists(st.tuples(st.sampled_from(SUFFIXES), contents), min_size=1, max_size=6)


@EXAMPLES
@given(files=corpora, min_chars=st.integers(0, 20))
def test_corpus_reader_reads_and_counts_any_bytes(files, min_chars):
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory) / "corpus"
        root.mkdir()
        for index, (suffix, data) in enumerate(files):
            (root / f"doc{index}{suffix}").write_bytes(data)
        config = IngestConfig(source=str(root), min_chars=min_chars, max_doc_chars=128)
        corpus = Path(directory) / "corpus.parquet"

        stats = write_corpus(config, local_files(config.source), None, corpus, Path(directory) / "parts")
        rows = pq.read_table(corpus).to_pylist()

    assert stats.files_read == len(files)
    assert stats.documents_out == len(rows) == stats.documents_train + stats.documents_val
    text_files = sum(suffix in (".txt", ".py") for suffix, _ in files)
    assert stats.files_binary_skipped <= text_files
    assert (
        stats.documents_out + stats.dropped_short + stats.dropped_duplicate
        <= stats.documents_in + stats.pieces_from_splits
    )
    texts = [row["text"] for row in rows]
    assert len(set(texts)) == len(texts)  # exact duplicates dropped
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        row["text"].encode("utf-8")  # strict: no lone surrogate survives
        assert "\x00" not in row["text"] and len(row["text"]) >= min_chars
        assert row["split"] in ("train", "val")
