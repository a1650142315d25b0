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


# The rooms' own rules (docs/architecture.md): a room -> the rooms it may import. A module is
# in the longest room that prefixes its name; `tasks` alone is the stage modules.
ROOMS = {
    "ops": ("ops", "tasks.core", "model"),
    "tasks.core": ("tasks.core", "model"),
    "tasks.models": ("tasks.models", "tasks.core", "tasks.tracking.registry", "model"),
    # datasets names the data stages' Config and Output types: see test_tracking_takes_only_types_from_stages
    "tasks.tracking": ("tasks.tracking", "tasks.core", "model", "tasks.ingest", "tasks.bpe", "tasks.shard"),
    "model": ("model",),
}
# Where a library's imports may appear, beyond its own room: Prefect in flows/ and in the
# stage modules' thin tasks; MLflow in tasks/tracking. Each exception is named with its reason.
LIBRARY_ROOMS = {
    "prefect": (
        "flows",
        "tasks.ingest",
        "tasks.bpe",
        "tasks.shard",
        "tasks.pretrain",
        "tasks.evaluate",
        "tasks.finetune",
        "tasks.register",
    ),
    "mlflow": ("tasks.tracking",),
}
LIBRARY_EXCEPTIONS = {
    "prefect": {
        "ops.embedded_server": "starts and watches the embedded Prefect server",
        "tasks.core.stage_state": "a stage task ends in a Prefect state naming the reused directory",
        "tasks.core.train_progress": "the training tasks' Prefect progress artifacts",
        "tasks.tracking.stage_run": "each stage's markdown report artifact and its retry attempt number",
        "tasks.tracking.datasets": "the track-data task",
    },
    "mlflow": {"cli.app": "tells a lost tracking server (MLflow's own error) from a bug"},
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


def room(module: str) -> str | None:
    return max((r for r in ROOMS if module == r or module.startswith(f"{r}.")), key=len, default=None)


def test_each_room_imports_only_the_rooms_it_may():
    strays = [
        f"{MODULES[module].relative_to(REPO)}:{line} imports {imported}"
        for module in MODULES
        if room(module)
        for imported, _, line in imports(module)
        if not any(imported == allowed or imported.startswith(f"{allowed}.") for allowed in ROOMS[room(module)])
    ]
    assert strays == []


def test_tracking_takes_only_types_from_stages():
    """tasks/tracking/datasets names the data stages' Config and Output types, nothing else of theirs."""
    taken = [
        f"{MODULES[module].relative_to(REPO)}:{line} takes {names or 'the module'} from {imported}"
        for module in MODULES
        if room(module) == "tasks.tracking"
        for imported, names, line in imports(module)
        if stage(imported)
        and (
            module != "tasks.tracking.datasets" or not names or not all(n.endswith(("Config", "Output")) for n in names)
        )
    ]
    assert taken == []


def libraries(module: str) -> set[str]:
    """The top-level libraries among LIBRARY_ROOMS that `module` imports."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        found |= {name.split(".")[0] for name in names} & set(LIBRARY_ROOMS)
    return found


def test_prefect_and_mlflow_stay_in_their_rooms():
    strays = [
        f"{MODULES[module].relative_to(REPO)} imports {library}"
        for module in MODULES
        for library in libraries(module)
        if not any(module == r or module.startswith(f"{r}.") for r in LIBRARY_ROOMS[library])
        and module not in LIBRARY_EXCEPTIONS[library]
    ]
    assert strays == []
    # Every exception is still needed: a room that stopped importing the library loses its exception.
    assert all(library in libraries(module) for library, found in LIBRARY_EXCEPTIONS.items() for module in found)
