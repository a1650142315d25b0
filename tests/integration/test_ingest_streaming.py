"""Hugging Face sources with `ingest.streaming: true`: the same corpus, in bounded memory.

`hf:` with a local directory goes through `datasets.load_dataset` exactly as a hub name
does (the json builder, here with `streaming=True`), with no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
from support import REPO
from support.processes import PEAK_RSS_OF_INGEST
from tasks.ingest import CORPUS_ROW_GROUP_CHARS, IngestConfig, run_ingest, split_of
from tasks.ingest_filters import FilterConfig


def write_dataset(directory: Path, texts: list[str]) -> Path:
    """A dataset directory as `load_dataset` reads it: one jsonl file of `content` records."""
    directory.mkdir(parents=True)
    with open(directory / "train.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"content": text}) + "\n")
    return directory


def streaming_config(data: Path, **settings) -> IngestConfig:
    # The filters are off: these synthetic documents repeat themselves, and near-dedup would drop them.
    settings = {
        "source": f"hf:{data}",
        "streaming": True,
        "text_field": "content",
        "val_fraction": 0.3,
        "filters": FilterConfig.off(),
        **settings,
    }
    return IngestConfig(**settings)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_a_streamed_source_gives_the_rows_in_order_and_the_same_corpus_as_a_download(tmp_path):
    texts = [f"document {i}\n" + "some words on a line\n" * (i % 7 + 3) for i in range(40)] + ["short"]
    data = write_dataset(tmp_path / "data", texts)
    streamed = run_ingest(streaming_config(data), tmp_path / "streamed")
    rows = pq.read_table(streamed.corpus).to_pylist()
    assert [(row["id"], row["text"], row["split"]) for row in rows] == [
        (f"train:{i}", text, split_of(f"train:{i}", 0.3, 0)) for i, text in enumerate(texts[:40])
    ]
    assert streamed.report["dropped_short"] == 1
    downloaded = run_ingest(streaming_config(data).model_copy(update={"streaming": False}), tmp_path / "downloaded")
    assert downloaded.fingerprint == streamed.fingerprint  # how rows arrive is not part of it
    assert downloaded.corpus.read_bytes() == streamed.corpus.read_bytes()


def test_a_streamed_source_without_the_text_field_names_it(tmp_path):
    data = write_dataset(tmp_path / "data", [f"document {i} " * 20 for i in range(10)])
    with pytest.raises(
        UserError, match=r"ingest.text_field: 'body' is not a column of hf:.*\(columns: \['content'\]\)"
    ):
        run_ingest(streaming_config(data, text_field="body"), tmp_path / "ws")


def peak_rss_streaming(tmp_path: Path, megabytes: int) -> tuple[int, Path]:
    """Peak memory (RSS, fresh process) of streaming a `megabytes` MB dataset of distinct
    8 KB documents; and the corpus it wrote."""
    documents = megabytes * 128
    data = write_dataset(tmp_path / f"data-{megabytes}", (os.urandom(4096).hex() for _ in range(documents)))
    config = streaming_config(data)
    workspace = tmp_path / f"ws-{megabytes}"
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_INGEST, config.model_dump_json(), str(workspace)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    return int(result.stdout.split()[-1]), next(workspace.rglob("corpus.parquet"))


def test_a_streamed_corpus_is_written_in_row_groups_in_bounded_memory(tmp_path):
    # From 32 MB on, the reading buffers (datasets reads JSON in 10 MB blocks) are warm.
    peak_small, _ = peak_rss_streaming(tmp_path, 32)
    peak_large, corpus = peak_rss_streaming(tmp_path, 96)
    # Holding the corpus would take 64 MB more text (and more as Python strings) for the
    # larger one. Measured: about 500 MB for both (datasets and pyarrow loaded), give or
    # take 20 MB from run to run.
    assert peak_large < peak_small + 30e6, f"peak {peak_large / 1e6:.0f} MB vs {peak_small / 1e6:.0f} MB for 32 MB"
    file = pq.ParquetFile(corpus)
    assert file.metadata.num_rows == 96 * 128
    chars = [
        pc.sum(pc.utf8_length(file.read_row_group(g, columns=["text"]).column("text"))).as_py()
        for g in range(file.num_row_groups)
    ]
    assert file.num_row_groups >= 90  # written as it streams, one ~1M-character group at a time
    assert all(CORPUS_ROW_GROUP_CHARS <= size < CORPUS_ROW_GROUP_CHARS + 8192 for size in chars[:-1])
