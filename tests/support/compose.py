"""infra/ as docker compose reads it: the compose file, the `.env` example, interpolation.

There is no Docker engine where the tests run, so this reads the compose file with
pyyaml and applies compose's variable interpolation itself (the subset infra/ uses:
`${VAR}`, `${VAR:?message}`, `${VAR:-default}` and `$$` for a literal `$`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from support import REPO

INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"

# `$$`, or `${NAME}` with an optional `:?message` / `?message` / `:-default` / `-default`.
_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[?-])(?P<arg>[^}]*))?\})")


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def load_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines as compose reads an env file (comments and blank lines skipped)."""
    variables = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}:{number}: not KEY=VALUE: {line!r}")
        variables[name.strip()] = value.strip()
    return variables


def strings(node: Any) -> Iterator[str]:
    """Every string in a parsed YAML document (mapping keys excluded)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def variables_used(node: Any) -> set[str]:
    return {m["name"] for text in strings(node) for m in _REFERENCE.finditer(text) if m["name"]}


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """`text` with every reference replaced as compose does; a required variable that is
    unset or empty raises ValueError with its message."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        value = variables.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("?", ":?") and missing:
            raise ValueError(f"{name}: {arg or 'required'}")
        if op in ("-", ":-") and missing:
            return arg
        return value or ""

    return _REFERENCE.sub(replace, text)


def service_environment(service: Mapping[str, Any], variables: Mapping[str, str]) -> dict[str, str]:
    """A service's `environment:` (mapping form) with the variables filled in."""
    return {key: interpolate(str(value), variables) for key, value in service.get("environment", {}).items()}
