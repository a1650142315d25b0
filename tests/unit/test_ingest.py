"""The ingest stage: sources, cleaning, splitting, deduplication, the document split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
from support import REPO
from support.corpus import seed_for
from support.processes import PEAK_RSS_OF_INGEST
from tasks.ingest import IngestConfig, file_doc_id, run_ingest, split_of, stdlib_files
from tasks.ingest_filters import FilterConfig

LINE = "the quick brown fox jumps over the lazy dog {i}\n"


def text(i: int, lines: int = 4) -> str:
    """A distinct document of a few lines."""
    return "".join(LINE.format(i=f"{i}.{j}") for j in range(lines))


def corpus_rows(output) -> list[dict]:
    return pq.read_table(output.corpus).to_pylist()


def ingest(tmp_path: Path, source: Path | str, ids: list[str], **settings) -> tuple[object, list[dict]]:
    """Ingest `source` (expected to keep documents `ids`) into `tmp_path/ws`."""
    config = IngestConfig(
        **{"source": str(source), "min_chars": 10, "val_fraction": 0.5, "seed": seed_for(ids), **settings}
    )
    output = run_ingest(config, tmp_path / "ws")
    return output, corpus_rows(output)


def test_directory_source_reads_supported_files_with_relative_ids(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / ".git").mkdir()
    for i, name in enumerate(["a.py", "pkg/b.md", "pkg/c.txt", "ignored.bin", ".git/d.txt"]):
        (src / name).write_text(text(i))
    ids = ["a.py", "pkg/b.md", "pkg/c.txt"]
    output, rows = ingest(tmp_path, src, ids)
    assert sorted(row["id"] for row in rows) == ids
    for row in rows:
        assert row["text"] == (src / row["id"]).read_text()
        assert row["split"] == split_of(row["id"], 0.5, seed_for(ids))
    assert output.report["files_read"] == 3
    assert output.report["documents_out"] == 3


def test_glob_jsonl_json_and_parquet_records(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [
        json.dumps({"text": text(0)}),
        "",
        "not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": text(1)}),
    ]
    (src / "r.jsonl").write_text("\n".join(lines) + "\n")
    (src / "r.json").write_text(json.dumps([{"text": text(2)}, {"text": 5}]))
    pq.write_table(pa.table({"text": [text(3), None]}), src / "r.parquet")
    pq.write_table(pa.table({"other": ["x"]}), src / "s.parquet")
    expected = {"r.jsonl:1": text(0), "r.jsonl:5": text(1), "r.json:0": text(2), "r.parquet:0": text(3)}
    output, rows = ingest(tmp_path, f"{src}/r*", list(expected))
    assert {row["id"]: row["text"] for row in rows} == expected
    # "not json", the record without "text", the number and the null
    assert output.report["records_without_text"] == 4


def test_parquet_without_text_column_is_counted_and_named_when_nothing_is_left(tmp_path):
    pq.write_table(pa.table({"other": [text(0)]}), tmp_path / "s.parquet")
    with pytest.raises(UserError, match=r"no usable document.*files_without_text_field=1.*ingest.text_field 'text'"):
        ingest(tmp_path, tmp_path / "s.parquet", ["s.parquet:0"])


def test_binary_files_non_utf8_bytes_and_nul_are_handled_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    (src / "latin1.txt").write_bytes(text(0).encode() + "café crème\n".encode("latin-1"))
    (src / "nul.py").write_bytes(text(1).encode() + b"x = 1\x00\x00\n")
    (src / "good.md").write_text(text(2))
    ids = ["latin1.txt", "nul.py", "good.md"]
    output, rows = ingest(tmp_path, src, ids)
    by_id = {row["id"]: row["text"] for row in rows}
    assert set(by_id) == set(ids)
    assert by_id["latin1.txt"] == text(0) + "caf\ufffd cr\ufffdme\n"
    assert by_id["nul.py"] == text(1) + "x = 1\n"
    report = output.report
    assert (report["files_binary_skipped"], report["replaced_bytes"], report["nul_chars_removed"]) == (1, 2, 2)


def test_nfc_normalization_is_optional(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    decomposed = text(0) + "cafe\u0301\n"
    (src / "a.txt").write_text(decomposed)
    (src / "b.txt").write_text(text(1))
    _, rows = ingest(tmp_path, src, ["a.txt", "b.txt"])
    assert rows[0]["text"] == decomposed
    _, rows = ingest(tmp_path, src, ["a.txt", "b.txt"], nfc=True)
    assert rows[0]["text"] == unicodedata.normalize("NFC", decomposed) != decomposed


def test_long_documents_are_cut_at_line_breaks_or_hard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [f"line {i:03d} of a long file\n" for i in range(40)]  # 24 characters: 4 fit in 100
    (src / "long.txt").write_text("".join(lines))
    alphabet = "".join(chr(ord("a") + i % 26) for i in range(250))
    (src / "oneline.txt").write_text(alphabet)
    output, rows = ingest(tmp_path, src, ["long.txt", "oneline.txt"], max_doc_chars=100, min_chars=1)
    pieces = {row["id"]: row["text"] for row in rows}
    assert [pieces[f"long.txt#{k}"] for k in range(10)] == ["".join(lines[i : i + 4]) for i in range(0, 40, 4)]
    assert [pieces[f"oneline.txt#{k}"] for k in range(3)] == [alphabet[:100], alphabet[100:200], alphabet[200:]]
    seed = seed_for(["long.txt", "oneline.txt"])
    assert {row["split"] for row in rows if row["id"].startswith("long.txt")} == {split_of("long.txt", 0.5, seed)}
    assert (output.report["documents_split"], output.report["pieces_from_splits"]) == (2, 13)


def test_short_documents_and_exact_duplicates_are_dropped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, content in [("a.txt", text(0)), ("b.txt", text(0)), ("c.txt", "tiny"), ("d.txt", text(1))]:
        (src / name).write_text(content)
    output, rows = ingest(tmp_path, src, ["a.txt", "d.txt"])
    assert sorted(row["id"] for row in rows) == ["a.txt", "d.txt"]  # the first copy is kept
    assert (output.report["dropped_duplicate"], output.report["dropped_short"]) == (1, 1)


def test_split_is_a_stable_hash_of_the_id():
    ids = [f"doc-{i}.py" for i in range(20_000)]
    val = [doc_id for doc_id in ids if split_of(doc_id, 0.1, seed=0) == "val"]
    assert 1800 < len(val) < 2200  # binomial(20000, 0.1): mean 2000, sd 42
    assert split_of("doc-5.py", 0.1, 0) == split_of("doc-5.py", 0.1, 0)
    assert val != [doc_id for doc_id in ids if split_of(doc_id, 0.1, seed=1) == "val"]


def test_growing_the_corpus_keeps_every_documents_split(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i:02d}.txt").write_text(text(i))
    _, before = ingest(tmp_path, src, ["00.txt"], val_fraction=0.3, seed=0)
    for i in range(30, 60):
        (src / f"{i:02d}.txt").write_text(text(i))
    _, after = ingest(tmp_path, src, ["00.txt"], val_fraction=0.3, seed=0)
    after_splits = {row["id"]: row["split"] for row in after}
    assert all(after_splits[row["id"]] == row["split"] for row in before)
    assert len(after) == 60


def test_stdlib_source_lists_the_standard_library_without_tests(tmp_path):
    files = stdlib_files()
    ids = [file_doc_id(path, files.root) for path in files.files]
    assert "json/decoder.py" in ids and "os.py" in ids
    assert ids == sorted(ids)
    parts = {part for doc_id in ids for part in doc_id.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    with_tests = stdlib_files(include_tests=True)
    assert any(path.parent.name == "test" for path in with_tests.files)


def test_hf_source_through_datasets(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"content": text(i)}) + "\n" for i in range(6)))
    ids = [f"train:{i}" for i in range(6)]
    output, rows = ingest(tmp_path, f"hf:{data}", ids, text_field="content")
    assert [row["id"] for row in rows] == ids
    assert [row["text"] for row in rows] == [text(i) for i in range(6)]
    with pytest.raises(UserError, match="ingest.text_field: 'text' is not a column"):
        ingest(tmp_path, f"hf:{data}", ids)


def test_a_pinned_hub_source_is_fingerprinted_and_recorded_by_the_commit_its_revision_names(tmp_path, monkeypatch):
    """`hf:` with a local dataset directory: `load_dataset` reads it as it reads a hub name, and the
    resolver (the hub's API) is faked: the branch `main` moves from one commit to another."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": text(i)}) + "\n" for i in range(6)))
    ids = [f"train:{i}" for i in range(6)]
    commits = {"main": "a" * 40, "a" * 40: "a" * 40}
    resolved: list[tuple[str, str]] = []

    def fake_hub_commit(name: str, revision: str) -> str:
        resolved.append((name, revision))
        return commits[revision]

    loaded_revisions: list[str | None] = []
    load_dataset = datasets.load_dataset

    def recording_load_dataset(*args, revision=None, **kwargs):
        loaded_revisions.append(revision)
        return load_dataset(*args, revision=revision, **kwargs)

    monkeypatch.setattr("tasks.ingest.hub_commit", fake_hub_commit)
    monkeypatch.setattr(datasets, "load_dataset", recording_load_dataset)

    unpinned, _ = ingest(tmp_path, f"hf:{data}", ids)
    pinned, rows = ingest(tmp_path, f"hf:{data}", ids, hf_revision="main")
    assert [row["text"] for row in rows] == [text(i) for i in range(6)]
    assert resolved == [(str(data), "main")]
    assert loaded_revisions == [None, "a" * 40]  # the commit is loaded, not the branch that may move
    manifest = json.loads((pinned.path / "manifest.json").read_text())
    assert (manifest["hf_revision"], manifest["hf_commit"]) == ("main", "a" * 40)
    assert "hf_commit" not in json.loads((unpinned.path / "manifest.json").read_text())
    assert pinned.fingerprint != unpinned.fingerprint

    # The commit it names, not the revision as written, is the corpus: its sha reuses the stage.
    by_sha, _ = ingest(tmp_path, f"hf:{data}", ids, hf_revision="a" * 40)
    assert (by_sha.fingerprint, by_sha.reused) == (pinned.fingerprint, True)

    # The dataset is pushed again: `main` names a new commit, and the stage runs again.
    commits["main"] = "b" * 40
    moved, _ = ingest(tmp_path, f"hf:{data}", ids, hf_revision="main")
    assert moved.fingerprint != pinned.fingerprint and not moved.reused
    assert json.loads((moved.path / "manifest.json").read_text())["hf_commit"] == "b" * 40


def test_a_revision_that_cannot_be_resolved_or_pins_no_hub_source_is_named(tmp_path):
    # The real resolver refuses a name that is no hub id before it reaches the network.
    with pytest.raises(UserError, match=r"ingest.hf_revision 'main' of hf:not/a/hub/id: cannot resolve it"):
        run_ingest(IngestConfig(source="hf:not/a/hub/id", hf_revision="main"), tmp_path / "ws")
    with pytest.raises(ValueError, match="hf_revision pins an hf:NAME source, not 'src'"):
        IngestConfig(source="src", hf_revision="main")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing/dir", "ingest.source: .*missing/dir: no such file or directory"),
        ("*.nothing", "the glob .* matches no files"),
        ("notes.rtf", "unsupported file type"),
    ],
)
def test_unusable_sources_name_the_path(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    Path("notes.rtf").write_text("{\\rtf1}")
    with pytest.raises(UserError, match=message):
        ingest(tmp_path, source, [source])


def test_an_empty_corpus_or_an_empty_split_is_fatal_and_says_what_to_change(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(UserError, match=r"no usable document.*dropped_short=1.*ingest.min_chars"):
        ingest(tmp_path, tmp_path / "a.txt", ["a.txt"])
    (tmp_path / "b.txt").write_text(text(0))
    with pytest.raises(UserError, match=r"the val split is empty .*: raise ingest.val_fraction"):
        ingest(tmp_path, tmp_path / "b.txt", ["b.txt"], val_fraction=0.01)
    assert not list((tmp_path / "ws").rglob("manifest.json"))


def peak_rss_ingesting_one_line(tmp_path: Path, megabytes: int) -> int:
    """Peak memory (RSS, in a fresh process) of ingesting a `megabytes` MB single-line document."""
    src = tmp_path / f"src-{megabytes}"
    src.mkdir()
    with open(src / "big.txt", "w") as f:
        for _ in range(megabytes // 2):  # distinct hex digits, no line break
            f.write(os.urandom(1 << 20).hex())
    (src / "good.txt").write_text(text(0))
    # The filters would drop the pieces of the line (too long a line and word): this measures the cutting.
    config = IngestConfig(
        source=str(src),
        max_doc_chars=1_000_000,
        val_fraction=0.5,
        seed=seed_for(["big.txt", "good.txt"]),
        filters=FilterConfig.off(),
    )
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_OF_INGEST, config.model_dump_json(), str(tmp_path / f"ws-{megabytes}")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1])


def test_a_50mb_single_line_document_is_cut_in_bounded_memory(tmp_path):
    peak_20mb = peak_rss_ingesting_one_line(tmp_path, 20)
    peak_50mb = peak_rss_ingesting_one_line(tmp_path, 50)
    # Reading the file whole would take 30 MB more bytes and 30 MB more text than 20 MB does
    # (measured: +100 MB or more); reading it in blocks takes the same.
    assert peak_50mb < peak_20mb + 15e6, f"peak {peak_50mb / 1e6:.0f} MB vs {peak_20mb / 1e6:.0f} MB for 20 MB"
    corpus = pq.read_table(next((tmp_path / "ws-50").rglob("corpus.parquet")), columns=["id"])
    assert sorted(corpus.column("id").to_pylist()) == sorted([f"big.txt#{k}" for k in range(53)] + ["good.txt"])
