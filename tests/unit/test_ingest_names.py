"""File names a file system can hold (issue 28): not UTF-8, with newlines, tabs and control
characters, 255 bytes long, deep paths, names that differ only in case or Unicode
normalisation. Each file becomes a document whose id names it unambiguously and reversibly;
ids of valid UTF-8 names are the names themselves, as before (the split hashes them)."""

from __future__ import annotations

import gzip
import os

import pytest

from model.errors import UserError
from support.bad_files import BEYOND_PATH_MAX, HOSTILE_NAMES, half, module_text, name_of, write_at
from tasks.ingest import IngestConfig, path_id, read_corpus, run_ingest
from tasks.ingest_filters import FilterConfig


def hostile_corpus(directory, extra: dict[bytes, bytes] | None = None):
    for index, name in enumerate(HOSTILE_NAMES.values()):
        write_at(directory, name, module_text(index).encode())
    for name, data in (extra or {}).items():
        write_at(directory, name, data)
    return directory


def config(source, **fields) -> IngestConfig:
    return IngestConfig(source=str(source), min_chars=1, val_fraction=0.5, filters=FilterConfig.off(), **fields)


def corpus_ids(output) -> list[str]:
    return [doc_id for batch in read_corpus(output.corpus) for doc_id in batch.column("id").to_pylist()]


def test_every_name_is_kept_counted_and_named_reversibly_and_a_rerun_reuses_the_stage(tmp_path):
    source = hostile_corpus(tmp_path / "source")

    output = run_ingest(config(source), tmp_path / "workspace")

    ids = corpus_ids(output)
    assert output.report["files_read"] == output.report["documents_out"] == len(HOSTILE_NAMES)
    assert sorted(name_of(doc_id) for doc_id in ids) == sorted(HOSTILE_NAMES.values())
    assert len(set(ids)) == len(ids)  # names that differ in case or normalisation stay apart
    for name in HOSTILE_NAMES.values():
        try:
            text = name.decode()
        except UnicodeDecodeError:
            continue
        if "\\x" not in text:
            assert text in ids  # a valid UTF-8 name is its own id, as before
    assert run_ingest(config(source), tmp_path / "workspace").reused


def test_ids_of_valid_utf8_paths_are_unchanged_and_others_escape_every_byte():
    for path in ["json/decoder.py", "café.py", "cafe\u0301.py", "new\nline.py", "Case.py", "a\\b.py"]:
        assert path_id(path) == path
    assert path_id(os.fsdecode(b"\xff\xfe.txt")) == "\\xff\\xfe.txt"
    assert path_id(os.fsdecode(b"d\xe9j\xe0/vu\\x.py")) == "d\\xe9j\\xe0/vu\\x5cx.py"
    assert path_id("back\\xffslash.py") == "back\\x5cxffslash.py"  # not the id of b"back\xffslash.py"
    assert path_id(os.fsdecode(b"back\xffslash.py")) == "back\\xffslash.py"


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (b"\xff\xfe.txt.gz", "\\xff\\xfe.txt.gz"),
        (b"cut\nshort.txt.gz", "cut\\nshort.txt.gz"),
        (b"tab\tand\x1bescape.txt.gz", "tab\\tand\\x1bescape.txt.gz"),
    ],
)
def test_an_unreadable_file_with_a_hostile_name_is_skipped_and_listed_or_named_on_one_line(tmp_path, name, shown):
    broken = half(gzip.compress(module_text(99).encode() * 20))
    source = hostile_corpus(tmp_path / "source", {name: broken})

    output = run_ingest(config(source), tmp_path / "workspace")
    assert output.report["files_unreadable"] == 1
    assert [name_of(entry["file"]) for entry in output.report["unreadable"]] == [name]

    with pytest.raises(UserError) as failed:
        run_ingest(config(source, on_unreadable="fail"), tmp_path / "workspace")
    message = str(failed.value)
    assert "\n" not in message and f"{shown}: unreadable" in message


def test_a_path_longer_than_the_system_allows_is_skipped_and_counted_or_named(tmp_path):
    source = hostile_corpus(tmp_path / "source", {BEYOND_PATH_MAX: module_text(98).encode()})

    output = run_ingest(config(source), tmp_path / "workspace")
    assert output.report["files_read"] == len(HOSTILE_NAMES) + 1
    assert output.report["documents_out"] == len(HOSTILE_NAMES)
    [entry] = output.report["unreadable"]  # the directory that cannot be listed, with its reason
    assert BEYOND_PATH_MAX.startswith(name_of(entry["file"]) + b"/")
    assert "File name too long" in entry["reason"]

    with pytest.raises(UserError, match="pppp: unreadable: .*File name too long"):
        run_ingest(config(source, on_unreadable="fail"), tmp_path / "workspace")


def test_a_named_pipe_and_a_broken_link_are_not_documents(tmp_path):
    source = hostile_corpus(tmp_path / "source")
    os.mkfifo(source / "pipe.txt")  # opening it would wait for a writer for ever
    (source / "broken.py").symlink_to(tmp_path / "nowhere.py")

    output = run_ingest(config(source), tmp_path / "workspace")
    assert output.report["files_read"] == output.report["documents_out"] == len(HOSTILE_NAMES)
