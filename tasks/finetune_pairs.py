"""Prompt/completion pairs for fine-tuning: read from a user's file or extracted from code.

Two sources give the same thing, a `PairSet` of train and val pairs:

- a jsonl or Parquet file with a prompt and a completion field (names from the config),
  optionally a `split` field; without one, a hash of the prompt decides the split (the
  corpus's rule, `tasks.ingest.split_of`), so it is stable when the file grows and never
  depends on row order;
- the default task of the embedded corpus, "docstring -> function": every function with a
  docstring in the corpus's Python documents, extracted with `ast`. The prompt is the
  `def` line and the docstring, the completion the rest of the body. A pair takes the
  split of the document it comes from, so no val function was seen in pretraining, and a
  val pair that also occurs verbatim in train is dropped.
"""

from __future__ import annotations

import ast
import codecs
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow.parquet as pq

from model.data import SPLITS
from model.errors import UserError
from model.jsonl import jsonl_records, source_lines
from tasks.ingest import split_of


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    source: str = ""  # where it came from: "doc-id:qualified.name" or "file:line"


@dataclass
class PairSet:
    train: list[Pair] = field(default_factory=list)
    val: list[Pair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count, for the report


# --- docstring -> function -------------------------------------------------------------


def dedent_block(lines: list[str], indent: int) -> str | None:
    """Remove `indent` leading whitespace characters from every line, or None if a line
    has less (a multi-line string at a lower indentation: cutting it would change it)."""
    out = []
    for line in lines:
        if line.strip() == "":
            out.append("\n")
        elif line[:indent].strip() == "":
            out.append(line[indent:])
        else:
            return None
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> Pair | str:
    """The pair for one function, or the reason it has none."""
    if ast.get_docstring(node, clean=False) is None:
        return "no docstring"
    if len(node.body) < 2:
        return "docstring only"
    docstring, first_statement = node.body[0], node.body[1]
    if first_statement.lineno <= docstring.end_lineno:
        return "body on the docstring's line"
    # Decorators are left out: the prompt starts at the `def` (or `async def`) line.
    prompt = dedent_block(lines[node.lineno - 1 : docstring.end_lineno], node.col_offset)
    completion = dedent_block(lines[docstring.end_lineno : node.end_lineno], node.col_offset)
    if prompt is None or completion is None:
        return "not dedentable"
    completion = completion.rstrip() + "\n"
    try:
        ast.parse(prompt + completion)
    except SyntaxError:
        return "does not parse alone"
    return Pair(prompt, completion)


def extract_pairs(source: str, origin: str = "") -> tuple[list[Pair], Counter]:
    """All docstring -> body pairs of a module (methods and nested functions included),
    in source order, and a count of the functions skipped, by reason."""
    tree = ast.parse(source)
    lines = source_lines(source)
    pairs, skipped = [], Counter()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in sorted(functions, key=lambda n: (n.lineno, n.col_offset)):
        result = function_pair(node, lines)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            pairs.append(replace(result, source=f"{origin}:{node.lineno}:{node.name}"))
    return pairs, skipped


def docstring_pairs(corpus_path: Path) -> PairSet:
    """The docstring -> function pairs of every Python document of the corpus, each in
    its document's split."""
    table = pq.read_table(corpus_path, columns=["id", "text", "split"])
    result = PairSet()
    for doc_id, text, split in zip(*(table.column(c).to_pylist() for c in ("id", "text", "split"))):
        if split not in SPLITS:
            continue
        try:
            pairs, skipped = extract_pairs(text, origin=str(doc_id))
        except (SyntaxError, ValueError, RecursionError):
            result.skipped["documents that are not Python"] += 1
            continue
        result.skipped.update(skipped)
        getattr(result, split).extend(pairs)
    seen_in_train = {(p.prompt, p.completion) for p in result.train}
    unseen_val = [p for p in result.val if (p.prompt, p.completion) not in seen_in_train]
    result.skipped["val pairs also in train"] += len(result.val) - len(unseen_val)
    result.val = unseen_val
    return result


# --- a user's file ---------------------------------------------------------------------


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) for each row of a jsonl or Parquet file; `where` is "file:line" or
    "file row N", for error messages."""
    if not path.is_file():
        raise UserError(f"{path}: fine-tuning file not found")
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: not a readable Parquet file ({e})") from None
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json"):
        raise UserError(f"{path}: fine-tuning data must be .jsonl or .parquet")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # a byte-order mark is not part of the first record
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        number = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{number}: not UTF-8 text ({e.reason})") from None
    return jsonl_records(text, str(path))


def file_pairs(path: Path, prompt_field: str, completion_field: str, val_fraction: float, seed: int = 0) -> PairSet:
    """Pairs from a jsonl or Parquet file; every problem names the file and line (or row)."""
    records = read_records(path)
    if not records:
        raise UserError(f"{path}: no prompt/completion pairs in the file")
    result = PairSet()
    for where, record in records:
        values = []
        for name in (prompt_field, completion_field):
            value = record.get(name)
            if not isinstance(value, str) or not value:
                problem = "missing" if value is None else "not a non-empty string"
                raise UserError(f"{where}: field '{name}' is {problem}")
            values.append(value)
        split = record.get("split") or split_of(values[0], val_fraction, seed)
        if split not in SPLITS:
            raise UserError(f"{where}: field 'split' must be 'train' or 'val', got {split!r}")
        getattr(result, split).append(Pair(values[0], values[1], where))
    if not result.train:
        raise UserError(f"{path}: no pairs in the train split")
    return result
