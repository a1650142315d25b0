"""JSON Lines text as records, every problem naming its line: fine-tuning pairs and priming
examples are read alike (in `model/` because the registered model's pyfunc, which bundles only
this package, reads its `examples` param with it)."""

from __future__ import annotations

import io
import json

from model.errors import UserError


def source_lines(source: str) -> list[str]:
    """Lines as `ast` and text editors number them: only \\n, \\r\\n and \\r end a line.

    (`str.splitlines` also splits at form feeds, U+2028 and other separators that the
    standard library's sources contain, and that a JSON string may hold unescaped: it
    would shift every line number after them, and cut a jsonl record in two.)
    """
    return io.StringIO(source, newline="").readlines()


def jsonl_records(text: str, source: str) -> list[tuple[str, dict]]:
    """(where, record) for each non-blank line of `text`, `where` being "source:line"."""
    records = []
    for number, line in enumerate(source_lines(text), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((where, record))
    return records
