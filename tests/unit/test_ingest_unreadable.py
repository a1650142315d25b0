"""Files that cannot be read as what their names say, in both modes of `ingest.on_unreadable`:
`skip` (the default) keeps the good files and lists the bad one with its reason; `fail`
stops the stage with a UserError naming the file and leaves it uncommitted."""

from __future__ import annotations

import gzip
import json
import re
import socket

import pytest

from model.errors import UserError
from support.bad_files import TEXT, UNREADABLE_FILES
from support.corpus import seed_for
from tasks.ingest import IngestConfig, run_in_order, run_ingest

GOOD = {"a.txt": TEXT + "a\n", "b.txt": TEXT + "b\n"}
REASONS = {
    "named.parquet": "Parquet magic bytes not found",
    "cut.parquet": "Parquet magic bytes not found",
    "half.json": "not valid JSON",
    "cut.txt.gz": "compressed",
    "cut.jsonl.zst": "compressed",
}


def corpus_with(tmp_path, name):
    source = tmp_path / "src"
    source.mkdir()
    for file, text in {**GOOD, name: UNREADABLE_FILES[name]}.items():
        (source / file).write_bytes(text if isinstance(text, bytes) else text.encode())
    return IngestConfig(source=str(source), min_chars=1, val_fraction=0.5, seed=seed_for(list(GOOD)))


@pytest.mark.parametrize("name", UNREADABLE_FILES)
def test_an_unreadable_file_is_skipped_and_reported_by_default(tmp_path, name):
    report = run_ingest(corpus_with(tmp_path, name), tmp_path / "ws").report
    assert report["files_unreadable"] == 1
    (entry,) = report["unreadable"]
    assert entry["file"] == name and REASONS[name].lower() in entry["reason"].lower()
    assert report["documents_out"] == 2


@pytest.mark.parametrize("name", UNREADABLE_FILES)
def test_an_unreadable_file_stops_the_stage_with_fail(tmp_path, name):
    config = corpus_with(tmp_path, name).model_copy(update={"on_unreadable": "fail"})
    with pytest.raises(UserError, match=f"{name}: unreadable"):
        run_ingest(config, tmp_path / "ws")
    assert not list((tmp_path / "ws").rglob("manifest.json"))


def test_compressed_text_and_jsonl_are_read(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt.gz").write_bytes(gzip.compress((TEXT + "a\n").encode()))
    (source / "b.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": TEXT + "b\n"}).encode()))
    seed = seed_for(["a.txt.gz", "b.jsonl.gz:1"])
    config = IngestConfig(source=str(source), min_chars=1, val_fraction=0.5, seed=seed)
    report = run_ingest(config, tmp_path / "ws").report
    assert report["documents_out"] == 2 and report["files_unreadable"] == 0


def test_a_listed_file_missing_where_its_chunk_runs_stops_the_stage_naming_it_and_the_host(tmp_path):
    """A worker that does not mount the source sees none of its files: that is no bad file to
    skip (the corpus would silently lose them), even with `on_unreadable: skip`."""
    config = corpus_with(tmp_path, "half.json")  # an undecodable file beside it is still only skipped
    missing = tmp_path / "src" / "b.txt"

    def on_a_worker_without_the_file(chunks):
        missing.unlink()  # listed (and fingerprinted) by the flow, absent where the chunk runs
        return run_in_order(chunks)

    host = re.escape(socket.gethostname())
    with pytest.raises(
        UserError, match=rf"ingest: {re.escape(str(missing))}: no such file on {host}: .*storage every worker mounts"
    ):
        run_ingest(config, tmp_path / "ws", on_a_worker_without_the_file)
    assert not list((tmp_path / "ws").rglob("manifest.json"))
