"""Docstring -> function pairs extracted with `ast`, and the user's pair files."""

from __future__ import annotations

import ast
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
from support.corpus import write_corpus
from tasks.finetune_pairs import docstring_pairs, extract_pairs, file_pairs

MODULE = '''\
import functools


def plain(x):
    """Return x doubled."""
    return 2 * x


def no_docstring(x):
    return x


def only_docstring():
    """Nothing else."""


def same_line(x): "Doc."; return x


@functools.lru_cache(maxsize=None)
def decorated(n):
    """Cached."""
    return n


async def fetch(url,
                timeout=3):
    """Fetch a URL.

    Long description.
    """
    # a comment before the body
    await something(url)

    return url


class Stack:
    """Not a function."""

    def push(self, item):
        """Push an item."""
        self.items.append(item)

    def text(self):
        """A string at column 0 cannot be dedented."""
        return """
x"""


def outer(a):
    """Outer."""
    def inner(b):
        """Inner."""
        return a + b
    return inner
'''


def by_name(pairs):
    return {pair.source.rsplit(":", 1)[1]: pair for pair in pairs}


def test_extracts_functions_methods_nested_async_and_decorated():
    pairs, skipped = extract_pairs(MODULE, origin="m.py")
    found = by_name(pairs)
    assert list(found) == ["plain", "decorated", "fetch", "push", "outer", "inner"]  # source order
    assert found["plain"].prompt == 'def plain(x):\n    """Return x doubled."""\n'
    assert found["plain"].completion == "    return 2 * x\n"
    assert found["decorated"].prompt.startswith("def decorated(n):")  # the decorator is not part of it
    assert (
        found["fetch"].prompt
        == 'async def fetch(url,\n                timeout=3):\n    """Fetch a URL.\n\n    Long description.\n    """\n'
    )
    assert found["fetch"].completion == "    # a comment before the body\n    await something(url)\n\n    return url\n"
    # a method and a nested function are dedented to stand alone
    assert found["push"].prompt == 'def push(self, item):\n    """Push an item."""\n'
    assert found["push"].completion == "    self.items.append(item)\n"
    assert found["inner"].completion == "    return a + b\n"
    assert "def inner(b):" in found["outer"].completion
    assert found["plain"].source == "m.py:4:plain"
    for pair in pairs:
        ast.parse(pair.prompt + pair.completion)
    assert skipped == {"no docstring": 1, "docstring only": 1, "body on the docstring's line": 1, "not dedentable": 1}


def test_line_numbers_ignore_form_feeds():
    # str.splitlines would count the form feed as a line break and shift the slices.
    source = 'x = 1\n\x0c\ndef f():\n    """Doc."""\n    return 1\n'
    (pair,), _ = extract_pairs(source)
    assert pair.prompt == 'def f():\n    """Doc."""\n' and pair.completion == "    return 1\n"


def test_corpus_pairs_follow_the_document_split(tmp_path):
    shared = 'def twin():\n    """Twin."""\n    return 2\n'
    corpus = write_corpus(
        tmp_path / "corpus.parquet",
        [
            ("a.py", MODULE, "train"),
            ("b.py", 'def held_out():\n    """Held out."""\n    return 1\n' + shared, "val"),
            ("c.py", shared + "x = 1\n", "train"),
            ("d.txt", "this is not python (", "train"),
        ],
    )
    pairs = docstring_pairs(corpus)
    assert [p.source for p in pairs.val] == ["b.py:1:held_out"]  # the twin is also in train
    assert {p.source.split(":")[0] for p in pairs.train} == {"a.py", "c.py"}
    assert pairs.skipped["val pairs also in train"] == 1
    assert pairs.skipped["documents that are not Python"] == 1


def test_jsonl_and_parquet_files(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        json.dumps({"q": "2+2=", "a": "4", "split": "val"}) + "\n\n" + json.dumps({"q": "1+1=", "a": "2"}) + "\n"
    )
    pairs = file_pairs(jsonl, "q", "a", val_fraction=0.01)
    assert [(p.prompt, p.completion, p.source) for p in pairs.val] == [("2+2=", "4", f"{jsonl}:1")]
    assert [p.source for p in pairs.train] == [f"{jsonl}:3"]

    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": ["a", "b"], "a": ["x", "y"]}), parquet)
    pairs = file_pairs(parquet, "q", "a", val_fraction=0.01)
    assert len(pairs.train) + len(pairs.val) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no prompt/completion pairs"),
        ("\n\n", "no prompt/completion pairs"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"pairs.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', r"pairs.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}\n', r"pairs.jsonl:1: field 'completion' is missing"),
        ('{"prompt": "a", "completion": 3}\n', r"pairs.jsonl:1: field 'completion' is not a non-empty string"),
        ('{"prompt": "a", "completion": "b", "split": "test"}\n', r"pairs.jsonl:1: field 'split' must be"),
    ],
)
def test_empty_or_malformed_file_names_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        file_pairs(path, "prompt", "completion", val_fraction=0.1)
    assert str(path) in str(error.value)


def test_jsonl_records_are_cut_at_newlines_only(tmp_path):
    # JSON strings may hold U+2028, U+2029 and NEL unescaped (json.dumps(ensure_ascii=False)
    # writes them so); str.splitlines would cut such a record in two. A leading byte-order
    # mark is not part of the first record.
    path = tmp_path / "pairs.jsonl"
    records = [
        {"prompt": "a\u2028b", "completion": "c\x85d", "split": "train"},
        {"prompt": "e", "completion": "f\u2029g", "split": "val"},
    ]
    path.write_text("\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    pairs = file_pairs(path, "prompt", "completion", val_fraction=0.1)
    assert [(p.prompt, p.completion, p.source) for p in pairs.train] == [("a\u2028b", "c\x85d", f"{path}:1")]
    assert [(p.prompt, p.completion, p.source) for p in pairs.val] == [("e", "f\u2029g", f"{path}:2")]


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(UserError, match=f"{path}:2: not UTF-8 text"):
        file_pairs(path, "prompt", "completion", val_fraction=0.1)


def test_a_damaged_parquet_file_is_named(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(UserError, match=f"{path}: not a readable Parquet file"):
        file_pairs(path, "prompt", "completion", val_fraction=0.1)


def test_parquet_without_the_field_names_file_and_row(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a", None], "completion": ["b", "c"]}), path)
    with pytest.raises(UserError, match=r"pairs.parquet row 1: field 'prompt' is missing"):
        file_pairs(path, "prompt", "completion", val_fraction=0.1)
