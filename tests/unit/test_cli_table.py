"""The command line is a table of commands over typed functions, and holds no long logic."""

from __future__ import annotations

import ast

from typer.testing import CliRunner

from cli.app import COMMANDS, app
from support import REPO

MAX_FUNCTION_LINES = 30


def test_every_command_of_the_table_is_the_apps_and_answers_help():
    registered = {command.name: command.callback for command in app.registered_commands}
    assert registered == COMMANDS
    listing = CliRunner().invoke(app, ["--help"])
    assert listing.exit_code == 0 and all(name in listing.output for name in COMMANDS)
    for name in COMMANDS:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_no_function_in_cli_is_longer_than_30_lines():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted((REPO / "cli").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
