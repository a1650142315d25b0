"""The pipeline config: every stage's settings, composed, loaded from YAML.

Each stage's settings are a pydantic model defined next to the code that reads them; this
module only composes them and loads a YAML preset with `--set dotted.key=value`
overrides. Every model forbids unknown fields, so a typo fails at load time naming the
field instead of being silently ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from flows.runners import TaskRunnerConfig
from model.config import ModelConfig
from model.device import DeviceName
from model.errors import UserError
from tasks.bpe import BPEConfig
from tasks.core.storage import Workspace
from tasks.evaluate import EvaluateConfig
from tasks.finetune import FinetuneConfig
from tasks.ingest import IngestConfig
from tasks.pretrain import PretrainConfig
from tasks.register import GATE_METRICS, RegisterConfig, gated_benchmark
from tasks.shard import ShardConfig

# The `register:` section's field shadows ABCMeta.register, which nothing calls on a config.
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig" shadows', category=UserWarning)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="MLflow experiment and registered-model name")
    workspace: Workspace = Field(Path("./workspace"), description="a local directory or s3://bucket/prefix")
    device: DeviceName = Field(
        "auto",
        description="where every model stage runs: auto (the first GPU, else the CPU), cpu, cuda, cuda:N; "
        "pretrain.device and finetune.device default to it. In no fingerprint: it does not change what is computed",
    )
    tracking_attempts: PositiveInt = Field(
        5,
        description="health checks of the MLflow server (and of `gptflow up`'s Prefect server) before a run "
        "starts, the waits between them doubling from 2 s (5: 30 s in all, time for a restarting server)",
    )
    task_runner: TaskRunnerConfig = TaskRunnerConfig()
    ingest: IngestConfig = IngestConfig()
    bpe: BPEConfig = BPEConfig()
    shard: ShardConfig = ShardConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    finetune: FinetuneConfig | None = Field(FinetuneConfig(), description="null: register the pretrained model")
    register: RegisterConfig = RegisterConfig()

    @model_validator(mode="after")
    def _training_runs_on_the_device(self) -> PipelineConfig:
        # Each training section's own `device`, when it names none, is the pipeline's.
        if "device" not in self.pretrain.model_fields_set:
            self.pretrain = self.pretrain.model_copy(update={"device": self.device})
        if self.finetune is not None and "device" not in self.finetune.model_fields_set:
            self.finetune = self.finetune.model_copy(update={"device": self.device})
        return self

    @model_validator(mode="after")
    def _one_tokenizer(self) -> PipelineConfig:
        if self.model.init_from is not None and self.bpe.model_fields_set:
            fields = ", ".join(f"bpe.{name}" for name in sorted(self.bpe.model_fields_set))
            raise ValueError(
                f"{fields} would be ignored: with model.init_from the pretrained model's own tokenizer is used "
                "(nothing is trained); remove them"
            )
        return self

    @model_validator(mode="after")
    def _gate_on_a_configured_benchmark(self) -> PipelineConfig:
        # Otherwise found only at the register stage, after training.
        gate = self.register.gate_metric
        if gate not in GATE_METRICS and not gated_benchmark(gate, self.evaluate.benchmarks):
            names = [benchmark.name for benchmark in self.evaluate.benchmarks] or "none"
            raise ValueError(f"register.gate_metric {gate!r} is no figure of evaluate.benchmarks (configured: {names})")
        return self

    @model_validator(mode="after")
    def _windows_fit_the_model(self) -> PipelineConfig:
        # Otherwise found only when pretraining starts, after the data stages have run.
        # A pretrained model's context is known once it is loaded: pretraining checks it.
        if self.model.init_from is not None:
            return self
        block_size = self.model.resolve(vocab_size=1).block_size
        if self.shard.seq_len > block_size:
            raise ValueError(
                f"shard.seq_len ({self.shard.seq_len}) exceeds the model's context (model.block_size {block_size})"
            )
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (1e-3, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected dotted.key=value")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def describe_validation_error(source: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        if item["loc"]:
            problems.append(f"field '{'.'.join(str(part) for part in item['loc'])}': {item['msg']}")
        else:  # a check across sections, whose message names the fields
            problems.append(item["msg"].removeprefix("Value error, "))
    return f"{source}: " + "; ".join(problems)


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML preset, apply `dotted.key=value` overrides, validate everything."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable YAML file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(describe_validation_error(str(path), e)) from None
