"""Every key of a config, read from its pydantic models: dotted key, type, default and description.

`gptflow config CONFIG` prints a resolved config with it (`config_yaml`: YAML, each key's type,
default and description in a comment above it, as litgpt's `--print_config` does), and
`cli/reference.py` writes docs/config-reference.md with it (`config_markdown`).
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}  # annotated_types' bounds, as written here
NOT_GIVEN = object()  # no config instance: the keys alone (the reference)


@dataclass(frozen=True)
class ConfigKey:
    """A setting, or a section (a nested model) whose keys follow it."""

    key: str  # dotted, e.g. "pretrain.max_steps"
    type: str  # e.g. "int > 0", "adamw | muon", "section | null"
    default: Any  # JSON-able; PydanticUndefined when the key is required; None for a section
    description: str
    value: Any = NOT_GIVEN  # the resolved config's (JSON-able); for a section, None when it is off
    section: bool = False


def type_name(annotation: Any, metadata: list[Any] | tuple[Any, ...] = ()) -> str:
    """`int > 0`, `adamw | muon`, `path | str`, `list[str] | null`: a type as one writes its YAML."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0], [*args[1:], *metadata])
    if origin is Literal:
        name = " | ".join(str(arg) for arg in args)
    elif origin in (Union, types.UnionType):
        name = " | ".join(type_name(arg) for arg in args)
    elif origin is not None:
        name = f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(arg) for arg in args)}]"
    elif annotation is type(None):
        name = "null"
    else:
        name = getattr(annotation, "__name__", str(annotation)).lower()
    bounds = [f"{sign} {getattr(m, bound)}" for m in metadata for bound, sign in BOUNDS.items() if hasattr(m, bound)]
    return f"{name} ({', '.join(bounds)})" if bounds else name


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section (`PretrainConfig`, or `FinetuneConfig | None`); None for a setting,
    a list of models included (`evaluate.benchmarks`: its items are the value, not keys)."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    models = [c for c in (annotation, *options) if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def description(model: type[BaseModel], name: str) -> str:
    """The field's description, or the one of the base model whose field it redefines (a new default
    often comes without one: FinetuneConfig's `max_steps` is TrainConfig's)."""
    for base in model.__mro__:
        field = getattr(base, "__pydantic_fields__", {}).get(name)
        if field is not None and field.description:
            return " ".join(field.description.split())
    return ""


def setting(model: type[BaseModel], name: str, prefix: str, value: Any) -> ConfigKey:
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    return ConfigKey(
        prefix + name,
        type_name(field.annotation, field.metadata),
        default if default is PydanticUndefined else to_jsonable_python(default),
        description(model, name),
        value if value is NOT_GIVEN else to_jsonable_python(value),
    )


def section(key: str, field: FieldInfo, model: type[BaseModel], value: Any) -> ConfigKey:
    nullable = type(None) in get_args(field.annotation)
    own_doc = model.__dict__.get("__doc__")  # not BaseModel's, which a model without one inherits
    text = " ".join((field.description or own_doc or "").split())
    value = None if value is None else NOT_GIVEN  # a section's own value: only whether it is off
    return ConfigKey(key, "section | null" if nullable else "section", None, text, value, section=True)


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a list's items (`evaluate.benchmarks`: `list[BenchmarkConfig]`), else None."""
    items = get_args(annotation) if get_origin(annotation) is list else ()
    models = [c for c in items if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if models else None


def config_keys(model: type[BaseModel], config: Any = NOT_GIVEN, prefix: str = "") -> Iterator[ConfigKey]:
    """Every key of `model`, depth first; with `config` (an instance), each with its value there.
    A section the config turns off (`finetune: null`) is listed without its keys."""
    for name, field in model.model_fields.items():
        value = NOT_GIVEN if config is NOT_GIVEN else getattr(config, name)
        nested = section_model(field.annotation)
        if nested is None:
            yield setting(model, name, prefix, value)
            if item := list_item_model(field.annotation):  # the keys each item has (`benchmarks[].name`)
                yield from config_keys(item, prefix=f"{prefix}{name}[].")
            continue
        yield section(prefix + name, field, nested, value)
        if value is not None:
            yield from config_keys(nested, value, prefix=f"{prefix}{name}.")


def inline(value: Any) -> str:
    """A value as one line of YAML (flow style; JSON, which YAML reads too, for a multi-line string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).removesuffix("...\n").strip()
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


def summary(key: ConfigKey) -> str:
    """`int > 0, default 250: what it does`; for a section, what it is."""
    if key.section:
        return f"{key.type}: {key.description}" if key.description else key.type
    default = "required" if key.default is PydanticUndefined else f"default {inline(key.default)}"
    return f"{key.type}, {default}" + (f": {key.description}" if key.description else "")


def config_yaml(config: BaseModel) -> str:
    """The resolved `config` as YAML that loads back to it, each key under a comment saying what it is."""
    lines = []
    for key in config_keys(type(config), config):
        indent, name = "  " * key.key.count("."), key.key.rpartition(".")[2]
        if "[]." in key.key:  # a key of a list's items: described, its values are in the list above
            lines.append(f"{indent}# each item's {name}: {summary(key)}")
            continue
        if not key.section or key.description:  # a section says "section" by its shape already
            lines.append(f"{indent}# {summary(key)}")
        if key.section:
            lines.append(f"{indent}{name}:" + (" null" if key.value is None else ""))
        else:
            lines.append(f"{indent}{name}: {inline(key.value)}")
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_markdown(model: type[BaseModel]) -> str:
    """Every key of `model`: a table per section (a section's own keys before its subsections')."""
    header = ["| key | type | default | description |", "|---|---|---|---|"]
    rows: dict[str, list[str]] = {"": []}  # section key ("" at the top) -> its settings' rows
    described: dict[str, str] = {}
    for key in config_keys(model):
        if key.section:
            rows[key.key], described[key.key] = [], key.description
            continue
        default = "required" if key.default is PydanticUndefined else f"`{cell(inline(key.default))}`"
        row = f"| `{key.key}` | `{cell(key.type)}` | {default} | {cell(key.description)} |"
        rows.setdefault(key.key.rpartition(".")[0], []).append(row)  # a list's items: a table of their own
    parts = []
    for name, section_rows in rows.items():
        parts += [f"## `{name}`", ""] if name else []
        parts += [described[name], ""] if described.get(name) else []
        parts += [*header, *section_rows, ""] if section_rows else []
    return "\n".join(parts)
