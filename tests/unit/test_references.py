"""The generated references under docs/ are what the code says, and `gptflow config` prints a
resolved config that loads back to itself, every key described as the pydantic models describe it."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from cli.app import app
from cli.config_listing import config_keys
from cli.reference import REFERENCES
from flows.pipeline_config import PipelineConfig, load_config
from support import REPO

TINY = REPO / "configs" / "tiny.yaml"


def test_the_committed_references_are_up_to_date():
    for path, render in REFERENCES.items():
        committed = (REPO / path).read_text() if (REPO / path).is_file() else ""
        assert committed == render(), f"{path} is out of date: run `python -m cli.reference` and commit it"


def property_descriptions(schema: dict) -> set[str]:
    """Every field description in pydantic's own JSON schema of the config (its sections under $defs)."""
    models = [schema, *schema.get("$defs", {}).values()]
    described = (field.get("description") for model in models for field in model.get("properties", {}).values())
    return {" ".join(text.split()) for text in described if text}


def printed_config(*overrides: str) -> str:
    result = CliRunner().invoke(app, ["config", str(TINY), *(arg for o in overrides for arg in ("--set", o))])
    assert result.exit_code == 0, result.output
    return result.output


def test_config_prints_the_resolved_config_with_every_key_described():
    printed = printed_config("pretrain.lr=0.002")
    expected = load_config(TINY, ["pretrain.lr=0.002"]).model_dump(mode="json")
    assert yaml.safe_load(printed) == expected and expected["pretrain"]["lr"] == 0.002  # the resolved values
    comments = " ".join(line.strip() for line in printed.splitlines() if line.lstrip().startswith("#"))
    undescribed = {text for text in property_descriptions(PipelineConfig.model_json_schema()) if text not in comments}
    assert undescribed == set()
    assert "# int (> 0), default 250" in printed  # pretrain.max_steps: its type and default


def test_config_prints_a_section_turned_off_as_null():
    printed = printed_config("finetune=null")
    assert "finetune: null" in printed.splitlines() and yaml.safe_load(printed)["finetune"] is None


def test_a_bad_override_is_one_line():
    result = CliRunner().invoke(app, ["config", str(TINY), "--set", "pretrain.lr=-1"])
    assert result.exit_code != 0 and "pretrain.lr" in str(result.exception)


def test_every_config_key_is_described():
    """The reference and `gptflow config` are only as good as the models' descriptions."""
    undescribed = [key.key for key in config_keys(PipelineConfig) if not (key.section or key.description)]
    assert undescribed == [], "give these fields a description= in their pydantic model"
