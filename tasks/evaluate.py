"""Stage: evaluate a model on the val shards and the held-out documents, and sample from it.

Figures (names as logged to MLflow):

    val_loss, val_perplexity, val_bits_per_byte, val_accuracy, val_tokens
        over the windows of the val shards (next-token targets, as in pretraining): all of
        them, or `max_windows` evenly spaced ones (`model.scoring.val_windows`, the windows
        that pretraining's validation scores)
    doc_loss, doc_perplexity, doc_bits_per_byte, doc_accuracy, doc_tokens
        sliding windows over whole held-out documents (`stride` apart, each token scored
        once with up to block_size tokens of context); a document is scored as
        `<|endoftext|> text <|endoftext|>`, as it sits in the token stream
    eval_tokens_per_s
        scoring throughput on the val shards
    <name>_acc, <name>_acc_norm, <name>_perplexity, <name>_examples, <name>_truncated
        each of `benchmarks` (tasks/evaluate_benchmarks.py), scored as lm-evaluation-harness does

Samples: each configured prompt continued by the model, written to `samples.md` (to read)
and `samples.json` (prompt and completion columns: MLflow's table of the run, which lines
up the samples of several runs).

Output directory `<workspace>/evaluate/<fingerprint>/`: `metrics.json`, `samples.md` and
`samples.json` and `manifest.json` (written last). The fingerprint covers the settings that change the
figures and the identity of the weights, tokenizer, shards, corpus and benchmark sources (by
content); not the batch size or device. On a GPU the model scores in bf16 autocast with fp32
logits and loss sums (`model.device`), so its figures stay comparable with a CPU evaluation's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from tokenizers import Tokenizer

from model.data import ShardManifest
from model.device import resolve_device
from model.errors import UserError
from model.generate import generate
from model.gpt import GPT
from model.scoring import (
    VAL_WINDOWS,
    LossTotals,
    score_batches,
    sliding_window_batches,
    sliding_windows,
    val_windows,
    window_batches,
)
from model.special_tokens import special_ids
from tasks.bpe import load_tokenizer, token_byte_lengths
from tasks.core.stage_state import finished
from tasks.core.train_progress import phase_progress, phase_steps
from tasks.core.workspace import MANIFEST, StageDir, fingerprint, sha256_file, write_json_atomic
from tasks.evaluate_benchmarks import BenchmarkConfig, benchmark_figures, score_names, source_digests
from tasks.ingest import read_corpus
from tasks.models.sources import load_model_source
from tasks.tracking.stage_run import Report, metrics_markdown, stage_run

FORMAT_VERSION = 2  # 2: samples.json, the samples as a table (logged with mlflow.log_table)
SAMPLES_TABLE = "samples.json"  # {"prompt": [...], "completion": [...]}
HEADLINE = ("val_loss", "val_perplexity", "val_bits_per_byte", "doc_perplexity", "doc_bits_per_byte")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(["def fibonacci(n):", "class Stack:"], description="fixed prompts to sample from")
    max_new_tokens: PositiveInt = Field(64, description="tokens sampled after each prompt")
    temperature: float = Field(0.8, ge=0.0, description="0 is greedy")
    top_k: int | None = Field(40, ge=0, description="keep the k most likely tokens; 0 or null keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens this likely")
    seed: int = Field(0, description="seeds the sampling of the samples")
    stride: PositiveInt | None = Field(
        None, description="sliding-window stride over held-out documents; null: half the context"
    )
    max_windows: PositiveInt | None = Field(
        VAL_WINDOWS, description="val windows scored, evenly spaced over the val shards; null: all"
    )
    max_documents: PositiveInt | None = Field(
        8, description="held-out documents scored with sliding windows, in corpus order; null: all"
    )
    batch_size: PositiveInt = Field(16, description="windows per forward pass (does not change the figures)")
    benchmarks: list[BenchmarkConfig] = Field(
        default_factory=list, description="downstream benchmarks (tasks/evaluate_benchmarks.py); none by default"
    )

    @field_validator("benchmarks")
    @classmethod
    def _distinct_names(cls, benchmarks: list[BenchmarkConfig]) -> list[BenchmarkConfig]:
        names = [benchmark.name for benchmark in benchmarks]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"benchmark names must differ (their figures are named after them): {repeated}")
        return benchmarks


class EvaluateOutput(BaseModel):
    path: Path
    fingerprint: str
    metrics: dict[str, float]
    samples: Path
    reused: bool = False  # True when a verified earlier evaluation was found


def held_out_documents(corpus: Path, tokenizer: Tokenizer, limit: int | None) -> list[list[int]]:
    """Token ids of the val documents in corpus order, each framed by <|endoftext|>.

    Encoded a corpus batch at a time: a Ctrl-C or SIGTERM is handled between batches, where
    one native call over the whole split would hold it off until the split is encoded."""
    eos = special_ids(tokenizer).eos
    documents: list[list[int]] = []
    for batch in read_corpus(corpus, split="val"):
        texts = batch.column("text").to_pylist()[: limit - len(documents) if limit else None]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        documents += [[eos, *encoding.ids, eos] for encoding in encodings]
        if limit and len(documents) == limit:
            break
    return documents


def sample_prompts(
    model: GPT, tokenizer: Tokenizer, config: EvaluateConfig, stage: str = "evaluate"
) -> list[tuple[str, str]]:
    """(prompt, completion) for each configured prompt, sampled with the config's settings;
    progress shown as `stage`'s phase "samples", a step per token of the longest completion."""
    if not config.prompts:
        return []
    eos = special_ids(tokenizer).eos
    prompts = [[eos, *tokenizer.encode(prompt, add_special_tokens=False).ids] for prompt in config.prompts]
    drawn = [0] * len(prompts)
    with phase_progress(stage, "samples", config.max_new_tokens) as progress:

        def on_token(row: int, token: int) -> None:
            drawn[row] += 1
            if drawn[row] > progress.last_step:  # the rows draw together: a step is each new position
                progress.update(drawn[row])

        completions = generate(
            model,
            prompts,
            config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            eos_id=eos,
            seed=config.seed,
            on_token=on_token,
        )
        progress.update(config.max_new_tokens)  # every row ended, some at <|endoftext|> before the last token
    return [(prompt, tokenizer.decode(ids)) for prompt, ids in zip(config.prompts, completions)]


def samples_markdown(samples: list[tuple[str, str]]) -> str:
    return "".join(f"### `{prompt}`\n\n```\n{prompt}{completion}\n```\n\n" for prompt, completion in samples)


def shard_figures(
    model: GPT, tokenizer: Tokenizer, config: EvaluateConfig, shards: Path, stage: str = "evaluate"
) -> dict[str, float]:
    """val_* figures over the val shards' windows (at most `max_windows`, evenly spaced),
    and the scoring throughput; progress shown as `stage`'s phase "val windows"."""
    manifest = ShardManifest.read(shards)
    if manifest.seq_len > model.config.block_size:
        raise UserError(
            f"{shards / MANIFEST}: windows of {manifest.seq_len} tokens exceed "
            f"the model's context ({model.config.block_size})"
        )
    windows = val_windows(shards, config.max_windows)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    device = next(model.parameters()).device
    started = time.perf_counter()
    n_batches = math.ceil(len(windows) / config.batch_size)
    batches = phase_steps(stage, "val windows", window_batches(windows, config.batch_size), n_batches)
    val = score_batches(model, batches, byte_lengths, device)
    return {**val.figures("val"), "eval_tokens_per_s": val.tokens / (time.perf_counter() - started)}


def document_stride(config: EvaluateConfig, block_size: int) -> int:
    """The sliding windows' stride over held-out documents: the config's, or half the context."""
    stride = config.stride or max(1, block_size // 2)
    if stride > block_size:
        raise UserError(f"evaluate.stride: {stride} exceeds the model's context ({block_size})")
    return stride


def document_figures(
    model: GPT, tokenizer: Tokenizer, config: EvaluateConfig, corpus: Path, stage: str = "evaluate"
) -> dict[str, float]:
    """doc_* figures: sliding windows over the held-out documents. They need only the
    corpus text, so doc_bits_per_byte compares models with different tokenizers. Progress
    shown as `stage`'s phase "held-out documents"."""
    block_size = model.config.block_size
    stride = document_stride(config, block_size)
    documents = held_out_documents(corpus, tokenizer, config.max_documents)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    # Counted first, for the phase's total: cheap next to scoring them.
    n_windows = sum(1 for tokens in documents for _ in sliding_windows(tokens, block_size, stride))
    batches = phase_steps(
        stage,
        "held-out documents",
        sliding_window_batches(documents, block_size, stride, config.batch_size),
        math.ceil(n_windows / config.batch_size),
    )
    docs = score_batches(model, batches, byte_lengths, next(model.parameters()).device) if documents else LossTotals()
    return docs.figures("doc")


def evaluate_model(
    model: GPT,
    tokenizer: Tokenizer,
    config: EvaluateConfig,
    shards: Path,
    corpus: Path,
    stage: str = "evaluate",
) -> dict[str, float]:
    """Every figure of the stage, for a loaded model; each phase's progress shown as `stage`'s."""
    documents = document_figures(
        model, tokenizer, config, corpus, stage
    )  # first: a stride the model cannot take fails at once
    return {
        **shard_figures(model, tokenizer, config, shards, stage),
        **documents,
        **all_benchmark_figures(model, tokenizer, config, stage),
    }


def all_benchmark_figures(
    model: GPT, tokenizer: Tokenizer, config: EvaluateConfig, stage: str = "evaluate"
) -> dict[str, float]:
    """The figures of every configured benchmark."""
    figures: dict[str, float] = {}
    for benchmark in config.benchmarks:
        figures |= benchmark_figures(model, tokenizer, benchmark, config.batch_size, stage)
    return figures


def evaluate_inputs(
    model_sha256: str,
    tokenizer_sha256: str,
    shards_fingerprint: str,
    corpus_sha256: str,
    benchmarks: Sequence[BenchmarkConfig] = (),
) -> dict[str, str]:
    """The identities the evaluation depends on: the weights, tokenizer, shards, corpus, and
    each benchmark's source by content (named `benchmark:<name>`, only when there are any)."""
    inputs = {
        "model": model_sha256,
        "tokenizer": tokenizer_sha256,
        "shards": shards_fingerprint,
        "corpus": corpus_sha256,
    }
    return inputs | source_digests(benchmarks)


def evaluate_settings(config: EvaluateConfig) -> dict:
    """The settings that change the figures. Benchmarks enter only when there are some (so the
    fingerprints of evaluations without them stay as they were), their sources by content
    through `evaluate_inputs`, not by path."""
    settings = config.model_dump(exclude={"batch_size", "benchmarks"})
    if config.benchmarks:
        settings["benchmarks"] = [benchmark.model_dump(exclude={"source"}) for benchmark in config.benchmarks]
    return settings


def evaluate_fingerprint(config: EvaluateConfig, inputs: dict[str, str]) -> str:
    return fingerprint("evaluate", evaluate_settings(config), inputs, FORMAT_VERSION)


def run_evaluate(
    config: EvaluateConfig,
    model: str | Path,
    tokenizer: Path,
    shards: Path,
    corpus: Path,
    workspace: Path,
    device: str = "auto",
    stage_name: str = "evaluate",
) -> EvaluateOutput:
    """Evaluate `model` (a checkpoint directory or `models:/...` URI) and sample from it; each
    phase's progress is shown as `stage_name`'s (e.g. "evaluate-finetuned: val windows").

    `tokenizer` is the pipeline's tokenizer.json, `shards` the shard stage directory,
    `corpus` the corpus Parquet file, `device` the pipeline's `device` setting. A completed
    evaluation of the same inputs is reused.
    """
    loaded = load_model_source(model, tokenizer, resolve_device(device))
    tokenizer_sha = sha256_file(tokenizer)
    shard_manifest = ShardManifest.read(shards)
    if shard_manifest.tokenizer_sha256 not in (None, tokenizer_sha):
        raise UserError(f"{shards / MANIFEST}: shards were encoded with another tokenizer than {tokenizer}")
    shards_identity = shard_manifest.fingerprint or sha256_file(shards / MANIFEST)
    inputs = evaluate_inputs(loaded.digest, tokenizer_sha, shards_identity, sha256_file(corpus), config.benchmarks)
    stage = StageDir(workspace, "evaluate", evaluate_fingerprint(config, inputs))

    def build(directory: Path) -> dict:
        tok = load_tokenizer(tokenizer)
        metrics = evaluate_model(loaded.model, tok, config, shards, corpus, stage_name)
        samples = sample_prompts(loaded.model, tok, config, stage_name)
        (directory / "samples.md").write_text(samples_markdown(samples))
        table = {"prompt": [prompt for prompt, _ in samples], "completion": [completion for _, completion in samples]}
        write_json_atomic(directory / SAMPLES_TABLE, table)
        write_json_atomic(directory / "metrics.json", metrics)
        names = ("metrics.json", "samples.md", SAMPLES_TABLE)
        files = [{"path": name, "sha256": sha256_file(directory / name)} for name in names]
        return {
            "format": FORMAT_VERSION,
            "fingerprint": stage.fingerprint,
            "inputs": inputs,
            "metrics": metrics,
            "files": files,
        }

    manifest, reused = stage.build_once(build)
    return EvaluateOutput(
        path=stage.path,
        fingerprint=stage.fingerprint,
        metrics=manifest["metrics"],
        samples=stage.path / "samples.md",
        reused=reused,
    )


def parent_figures(config: EvaluateConfig) -> list[str]:
    """The figures the parent run gets: the headline ones and the benchmarks' scores."""
    return [*HEADLINE, *(name for benchmark in config.benchmarks for name in score_names(benchmark))]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    config: EvaluateConfig,
    model: str | Path,
    tokenizer: Path,
    shards: Path,
    corpus: Path,
    workspace: Path,
    parent_run_id: str,
    device: str = "auto",
    run_name: str = "evaluate",
    parent_prefix: str = "",
) -> EvaluateOutput:
    """`run_evaluate` in a nested MLflow run named `run_name`; the headline figures also go
    on the parent run, named with `parent_prefix` (e.g. "finetuned_" for a second evaluation)."""
    with stage_run(parent_run_id, run_name, {"evaluate": config.model_dump(), "model": str(model)}) as stage:
        output = run_evaluate(config, model, tokenizer, shards, corpus, workspace, device, run_name)
        stage.finish(
            output.metrics,
            parent_metrics={parent_prefix + name: output.metrics[name] for name in parent_figures(config)},
            artifacts={output.samples: "evaluate", output.path / "metrics.json": "evaluate"},
            tables={SAMPLES_TABLE: json.loads((output.path / SAMPLES_TABLE).read_text())},
            report=Report(
                run_name,
                metrics_markdown(f"Evaluation of {model}", output.metrics)
                + f"\n## Samples\n\n{output.samples.read_text()}",
                "evaluation figures and samples",
            ),
        )
    return finished(output)
