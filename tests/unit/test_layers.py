"""The import graph of cli/, flows/, ops/, tasks/ and model/, read with `ast` (nothing is imported).

Layers: cli -> flows -> ops -> tasks -> model, never upward. No import cycle between modules. A stage
(tasks/<stage>.py, with its helpers tasks/<stage>_*.py) imports another stage only for that
stage's `Output` type, except register, which re-scores the champion with evaluate's code.
Every import counts, deferred ones inside functions too: they are cycles that merely wait.
The stages are the pipeline's own table (flows/stages.py), the one module imported here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from flows.stages import STAGES as STAGE_TABLE
from support import REPO

LAYERS = ("cli", "flows", "ops", "tasks", "model")  # each may import the ones after it
STAGES = tuple(STAGE_TABLE)  # ingest, bpe, shard, pretrain, evaluate, finetune, register
STAGE_MAY_USE = {("register", "evaluate")}  # (importer, imported): beyond the Output types

# The readers of the format a stage owns: another stage that consumes that output calls them
# rather than parsing the files itself.
FORMAT_READERS = {
    "ingest": {"read_corpus", "split_of"},
    "bpe": {"load_tokenizer", "token_byte_lengths"},
}


def module_names() -> dict[str, Path]:
    """Every module of the layers' packages, by dotted name (a package by its own name)."""
    modules = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_names()


def imports(module: str) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for each import statement of `module`
    that reaches one of the packages; `from package import submodule` counts as the submodule."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is this module's package, each further dot one package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in MODULES]
            for submodule in submodules:
                yield submodule, [], node.lineno
            if base in MODULES and len(submodules) < len(names):
                yield base, [name for name in names if f"{base}.{name}" not in MODULES], node.lineno


GRAPH = {module: sorted({imported for imported, _, _ in imports(module)} - {module}) for module in MODULES}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def stage(module: str) -> str | None:
    """The stage a tasks/ module serves: tasks/<stage>.py and tasks/<stage>_*.py."""
    parts = module.split(".")
    if len(parts) != 2 or parts[0] != "tasks":
        return None
    return next((s for s in STAGES if parts[1] == s or parts[1].startswith(f"{s}_")), None)


def borrowings() -> list[tuple[str, str, str]]:
    """(importer, imported, where and what) for each import of a stage module from another
    stage that is neither for Output types and format readers alone nor allowed by STAGE_MAY_USE."""
    return [
        (module, imported, f"{MODULES[module].relative_to(REPO)}:{line} takes {names or 'the module'} from {imported}")
        for module in MODULES
        if stage(module)
        for imported, names, line in imports(module)
        if stage(imported) not in (None, stage(module))
        and (stage(module), stage(imported)) not in STAGE_MAY_USE
        and not (
            names and all(name.endswith("Output") or name in FORMAT_READERS.get(stage(imported), ()) for name in names)
        )
    ]


def cycles() -> list[set[str]]:
    """The strongly connected components of GRAPH with more than one module (Tarjan's
    algorithm; hand-written because the standard library has none and this is its only use)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = lowlink[module] = len(index)
        stack.append(module)
        for imported in GRAPH[module]:
            if imported not in index:
                visit(imported)
                lowlink[module] = min(lowlink[module], lowlink[imported])
            elif imported in stack:
                lowlink[module] = min(lowlink[module], index[imported])
        if lowlink[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(component)

    for module in GRAPH:
        if module not in index:
            visit(module)
    return found


def test_the_graph_is_read():
    """The reader sees the imports every part of the house relies on (a reader that found
    none would pass every test below)."""
    assert "model.train" in GRAPH["tasks.pretrain"] and "tasks.pretrain" in GRAPH["flows.run.training"]
    assert "model.gpt" in GRAPH["model.train"]


def test_nothing_imports_upward():
    upward = [
        f"{MODULES[module].relative_to(REPO)}:{line} imports {imported}"
        for module in MODULES
        for imported, _, line in imports(module)
        if layer(imported) < layer(module)
    ]
    assert upward == []


def test_a_stage_imports_another_only_for_its_output_type():
    assert [what for _, _, what in borrowings()] == []


def test_no_import_cycle():
    assert cycles() == []
