"""Stage: fine-tune a pretrained model on prompt/completion pairs, with the pretraining engine.

The pairs come from `finetune.path` (jsonl or Parquet) or, by default, from the task
"docstring -> function" over the corpus's Python documents (`tasks.finetune_pairs`). Each pair is
trained as `prompt <|sep|> completion <|endoftext|>` with the loss on the completion only
(`model.finetune_data`), by `model.train.train`: the same loop, checkpoints and exact
resume as pretraining, with fine-tuning's own learning rate, steps and warmup.

The start is the pretraining output of the same run (a checkpoint directory) or a
registered model (`models:/NAME@ALIAS`, `models:/NAME/VERSION`).

Replay (`replay_fraction`): a share of every micro-batch's rows are windows of the pretraining
shards' train split (`model.replay`), so that the model stays a language model while it learns
the task. The shards then enter the fingerprint. Replay is off, with a message, when no shards
are given or they were encoded with another tokenizer than the model's.

Figures on the held-out (val) pairs, for the model before and after fine-tuning side by
side (`pretrained_*`, `finetuned_*`): completion loss and perplexity (one pair per row, so
each completion sees only its own prompt), and for the code task the share of generated
bodies for which `prompt + body` parses with `ast.parse` and does something beyond `pass`,
`...` or returning a constant or an undefined name (`parse_rate`, `completes_function`;
greedy decoding of at most `eval_max_new_tokens` tokens for at most `eval_pairs` pairs).

Output directory `<workspace>/finetune/<fingerprint>/`: `pairs-train.parquet`,
`pairs-val.parquet`, `checkpoints/step-N/`, `metrics.json`, and `manifest.json` last.
An interrupted run resumes from its newest checkpoint when run again.
"""

from __future__ import annotations

import ast
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from tokenizers import Tokenizer

from model.checkpoint import CheckpointTokens, attach_tokenizer, checkpoint_dirs
from model.config import RUN_ONLY
from model.data import ShardManifest, WindowLoader
from model.device import resolve_device
from model.errors import UserError
from model.finetune_data import EncodeReport, PairBatches, TooLong, encode_pairs, to_rows
from model.generate import generate
from model.gpt import GPT
from model.replay import ReplayBatches, replay_rows
from model.runtime import DistributedEnv
from model.scoring import IGNORE, score_batches
from model.special_tokens import special_ids
from model.train import train
from tasks import tracking
from tasks.bpe import load_tokenizer, token_byte_lengths
from tasks.core.checkpoint_mirror import mirrored_checkpoints
from tasks.core.phased_scoring import score_requests
from tasks.core.stage_state import finished
from tasks.core.train_progress import phase_steps, training_progress
from tasks.core.training_stage import Trained, TrainedOutput, TrainingStageConfig, train_once
from tasks.core.workspace import StageDir, fingerprint, sha256_file
from tasks.finetune_pairs import Pair, PairSet, docstring_pairs, file_pairs
from tasks.finetune_priming import document_requests, function_body, primed_layouts, primed_rows, priming_order
from tasks.models.sources import load_model_source
from tasks.tracking.loss_curves import live_loss_curves
from tasks.tracking.stage_run import Report, log_attempt, metrics_markdown, stage_run
from tasks.tracking.step_metrics import step_metrics

# 2: checkpoints' optimizer state keyed by parameter name (model.parallel.full_state);
# 3: the held-out table's primed row; the final checkpoint carries tokenizer.json and tokens.json;
# replay of pretraining windows (the shards enter the fingerprint)
# 4: the held-out table's document-primed row; the parse rate counts only bodies that do something
# (`completes_function`): a committed metrics.json would mix the old rate with the new rows
# 5: the document-primed row chooses its examples as the `<|sep|>` row does, passing over one too
# long for the row (under 4 the first one too long left the row with none)
FORMAT_VERSION = 5
DOCSTRING_TASK = "docstring-to-function"
HEADLINE = (
    "finetuned_completion_loss",
    "pretrained_completion_loss",
    "primed_completion_loss",
    "finetuned_parse_rate",
    "pretrained_parse_rate",
    "primed_parse_rate",
    "primed_document_completion_loss",
    "primed_document_parse_rate",
)
# The held-out table's rows: the figures' prefix and what the row is.
HELD_OUT_ROWS = {
    "pretrained": "pretrained, zero-shot (`prompt <|sep|>`)",
    "primed": "pretrained, primed with train pairs (`p <|sep|> c <|endoftext|>`)",
    "primed_document": "pretrained, primed with train pairs as document text (`p c`, blank lines between)",
    "finetuned": "fine-tuned",
}
GENERATION_BATCH = 32  # prompts generated together when measuring the parse rate


class FinetuneConfig(TrainingStageConfig):
    """The engine's TrainConfig with fine-tuning defaults, plus where the pairs come from."""

    max_steps: PositiveInt = 100
    batch_tokens: PositiveInt = Field(2048, description="tokens per optimizer step, over all micro-batches and ranks")
    lr: PositiveFloat = 3e-4
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(10, ge=0)
    # Run-only here, unlike pretraining: the held-out figures after training are the result.
    eval_every: int = Field(
        0, ge=0, description="steps between validation losses; 0: only at the end", json_schema_extra=RUN_ONLY
    )
    eval_batches: PositiveInt = Field(
        8, description="micro-batches of held-out pairs per rank in each validation", json_schema_extra=RUN_ONLY
    )

    replay_fraction: float = Field(
        0.25, ge=0, lt=1, description="share of each micro-batch's rows that are pretraining windows; 0: off"
    )
    task: Literal["docstring-to-function"] | None = Field(
        DOCSTRING_TASK, description="built-in task over the corpus; null when `path` gives the pairs"
    )
    path: Path | None = Field(None, description="jsonl or Parquet file of prompt/completion pairs")
    prompt_field: str = Field("prompt", description="`path`: the field of a record that holds the prompt")
    completion_field: str = Field("completion", description="`path`: the field that holds the completion")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="`path` without a split field: share of pairs held out")
    seq_len: PositiveInt | None = Field(None, description="row length in tokens; null: the model's context")
    packed: bool = Field(True, description="several whole pairs per row (true) or one padded pair per row")
    too_long: TooLong = Field("truncate", description="a pair longer than a row: cut the prompt's left, or drop it")
    eval_pairs: PositiveInt = Field(64, description="held-out pairs whose generated bodies are parsed")
    priming_shots: NonNegativeInt = Field(
        3,
        description="the held-out table's primed row: the pretrained model prompted with up to this many train "
        "pairs before each held-out prompt (tasks/finetune_priming.py); 0: no primed row",
    )
    eval_max_new_tokens: PositiveInt = Field(64, description="tokens generated per held-out prompt for the parse rate")
    start_from: str | None = Field(
        None, description="a registered model (models:/NAME@ALIAS) to start from instead of the pretraining output"
    )

    @model_validator(mode="after")
    def _one_source_of_pairs(self) -> FinetuneConfig:
        if (self.task is None) == (self.path is None):
            raise ValueError("set exactly one of finetune.task and finetune.path (task: null to use a file)")
        return self

    def settings(self) -> dict:
        """What decides the result; not `start_from`: the base weights' digest is an input."""
        settings = super().settings()
        del settings["start_from"]
        return settings


class FinetuneOutput(TrainedOutput):
    """The fine-tuned checkpoint and the held-out figures before and after."""


# --- data ---------------------------------------------------------------------------


def pairs_source(config: FinetuneConfig, corpus: Path) -> Path:
    """The file the pairs are read from: the config's, or the corpus for the built-in task."""
    if config.path is None:
        return corpus
    if not config.path.is_file():
        raise UserError(f"{config.path}: fine-tuning file not found (finetune.path)")
    return config.path


def load_pairs(config: FinetuneConfig, corpus: Path) -> PairSet:
    if config.path is not None:
        return file_pairs(config.path, config.prompt_field, config.completion_field, config.val_fraction, config.seed)
    pairs = docstring_pairs(corpus)
    if not pairs.train or not pairs.val:
        raise UserError(f"{corpus}: no docstring -> function pairs in the train or val split (is the corpus Python?)")
    return pairs


def write_pairs(pairs: list[Pair], path: Path) -> None:
    table = pa.table(
        {
            "prompt": [p.prompt for p in pairs],
            "completion": [p.completion for p in pairs],
            "source": [p.source for p in pairs],
        }
    )
    pq.write_table(table, path, compression="zstd")


def tokenize(tokenizer: Tokenizer, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    prompts = tokenizer.encode_batch([p.prompt for p in pairs], add_special_tokens=False)
    completions = tokenizer.encode_batch([p.completion for p in pairs], add_special_tokens=False)
    return [(p.ids, c.ids) for p, c in zip(prompts, completions)]


@dataclass
class TaskData:
    """The pairs as engine rows: train packed (or padded) per the config, val one pair per row."""

    train_rows: tuple[torch.Tensor, torch.Tensor]
    val_rows: tuple[torch.Tensor, torch.Tensor]
    train_report: EncodeReport
    val_report: EncodeReport

    @classmethod
    def encode(
        cls, tokenizer: Tokenizer, pairs: PairSet, seq_len: int, config: FinetuneConfig, source: Path
    ) -> TaskData:
        special = special_ids(tokenizer)
        train_examples, train_report = encode_pairs(tokenize(tokenizer, pairs.train), seq_len, config.too_long, special)
        val_examples, val_report = encode_pairs(tokenize(tokenizer, pairs.val), seq_len, config.too_long, special)
        if not train_examples:
            raise UserError(f"{source}: every train pair is longer than seq_len {seq_len} and was dropped")
        return cls(
            to_rows(train_examples, seq_len, config.packed, special),
            to_rows(val_examples, seq_len, packed=False, special=special),
            train_report,
            val_report,
        )

    @property
    def has_val(self) -> bool:
        return len(self.val_rows[0]) > 0

    def figures(self) -> dict[str, float]:
        return {
            "train_pairs": self.train_report.pairs,
            "val_pairs": self.val_report.pairs,
            "train_rows": len(self.train_rows[0]),
            "truncated_pairs": self.train_report.truncated + self.val_report.truncated,
            "dropped_pairs": self.train_report.dropped + self.val_report.dropped,
        }


# --- held-out figures ---------------------------------------------------------------


def completion_figures(
    model: GPT,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    byte_lengths: torch.Tensor,
    batch_size: int,
    phase: str = "completion loss",
) -> dict[str, float]:
    """Completion loss and perplexity over held-out rows (one pair per row); its progress shown as `phase`."""
    # Rows are right-padded and the model is causal: positions after a row's last scored
    # target cannot change its loss. Batching rows of similar length and cutting each batch
    # after its longest row skips most of the padding.
    positions = torch.arange(targets.size(1)).expand_as(targets)
    lengths = torch.where(targets != IGNORE, positions + 1, 0).amax(dim=1)
    order = lengths.argsort(descending=True)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = int(lengths[rows[0]])
            yield inputs[rows, :width], targets[rows, :width]

    n_batches = -(-len(order) // batch_size)
    scored = phase_steps("finetune", phase, batches(), n_batches)
    totals = score_batches(model, scored, byte_lengths, next(model.parameters()).device)
    return {"completion_loss": totals.loss, "completion_perplexity": totals.perplexity}


def completes_function(prompt: str, body: str) -> bool:
    """`prompt + body` parses as a function, and the body does something: at least one of the
    function's statements is not `pass`, `...`, a docstring or other bare constant or name, or a
    return of a constant or of a name the function never defines (`return result` with no
    `result`). A prompt alone (a `def` and its docstring) already parses: without the second
    rule a model that ends the function at once, or returns a guess, would count."""
    try:
        tree = ast.parse(prompt + body)
    except (SyntaxError, ValueError):  # ValueError: a NUL character in the source
        return False
    function = tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    defined = names_defined_in(function)
    return any(not does_nothing(statement, defined) for statement in function.body)


def names_defined_in(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """The function's parameters and every name its body binds (assignments, loops, imports, ...)."""
    arguments = function.args
    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
    names = {argument.arg for argument in every if argument is not None}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not function:
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def does_nothing(statement: ast.stmt, defined: set[str]) -> bool:
    """`pass`, a bare constant (`...`, a docstring) or name, or a return of a constant or of an undefined name."""
    if isinstance(statement, ast.Pass):
        return True
    if isinstance(statement, ast.Expr):
        return isinstance(statement.value, (ast.Constant, ast.Name))
    if isinstance(statement, ast.Return):
        value = statement.value
        return (
            value is None
            or isinstance(value, ast.Constant)
            or (isinstance(value, ast.Name) and value.id not in defined)
        )
    return False


def parse_rate(
    model: GPT,
    tokenizer: Tokenizer,
    pairs: list[Pair],
    max_new_tokens: int,
    prompts: list[list[int]] | None = None,
    phase: str = "parse rate",
    until_function_end: bool = False,
) -> float:
    """Share of `pairs` whose prompt, continued greedily, becomes a function that parses.
    `prompts`: the token ids to continue (primed ones); by default each pair's `prompt <|sep|>`.
    Its progress is shown as `phase`, a line per batch of generations. `until_function_end`: the
    body ends where the function does (`function_body`), not at `<|endoftext|>`."""
    # A prompt leaves room for the body (keeping its end when it must be cut): past the
    # context, generation slides its window and recomputes all of it at every new token
    # (learned positions), 23x slower on the default task. Half the context stays the
    # prompt's, whatever `max_new_tokens`.
    block_size = model.config.block_size
    room = max(block_size - max_new_tokens, block_size // 2)
    special = special_ids(tokenizer)
    if prompts is None:
        prompts = [[*ids, special.sep] for ids, _ in tokenize(tokenizer, pairs)]
    prompts = [prompt[-room:] for prompt in prompts]
    ok = 0
    starts = range(0, len(pairs), GENERATION_BATCH)
    for start in phase_steps("finetune", phase, starts, len(starts)):
        bodies = generate(
            model, prompts[start : start + GENERATION_BATCH], max_new_tokens, temperature=0.0, eos_id=special.eos
        )
        for pair, body in zip(pairs[start : start + GENERATION_BATCH], bodies):
            text = tokenizer.decode([t for t in body if t != special.eos])
            ok += completes_function(pair.prompt, function_body(pair.prompt, text) if until_function_end else text)
    return ok / len(pairs) if pairs else float("nan")


def held_out_figures(
    model: GPT,
    tokenizer: Tokenizer,
    config: FinetuneConfig,
    val_pairs: list[Pair],
    val_rows: tuple[torch.Tensor, torch.Tensor],
    prefix: str,
) -> dict[str, float]:
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    figures = completion_figures(model, *val_rows, byte_lengths, config.micro_batch_size, f"completion loss, {prefix}")
    if config.task == DOCSTRING_TASK:
        shown = val_pairs[: config.eval_pairs]
        figures["parse_rate"] = parse_rate(
            model, tokenizer, shown, config.eval_max_new_tokens, phase=f"parse rate, {prefix}"
        )
    return {f"{prefix}_{name}": value for name, value in figures.items()}


def primed_figures(
    model: GPT, tokenizer: Tokenizer, config: FinetuneConfig, pairs: PairSet, seq_len: int
) -> dict[str, float]:
    """The held-out table's primed row (tasks/finetune_priming.py): completion loss, parse rate,
    and the mean number of examples that fit (`primed_examples`)."""
    special = special_ids(tokenizer)
    held_out = tokenize(tokenizer, pairs.val)
    examples = tokenize(tokenizer, priming_order(pairs.train, config.seed))
    layouts = primed_layouts(examples, held_out, config.priming_shots, seq_len, config.eval_max_new_tokens, special)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    rows = primed_rows(layouts, held_out, seq_len, config.too_long, special)
    figures = completion_figures(model, *rows, byte_lengths, config.micro_batch_size, "completion loss, primed")
    if config.task == DOCSTRING_TASK:
        shown = config.eval_pairs
        primed = [prompt for prompt, _ in layouts[:shown]]
        figures["parse_rate"] = parse_rate(
            model, tokenizer, pairs.val[:shown], config.eval_max_new_tokens, primed, "parse rate, primed"
        )
    figures["examples"] = sum(used for _, used in layouts) / len(layouts)
    return {f"primed_{name}": value for name, value in figures.items()} | document_primed_figures(
        model, tokenizer, config, pairs, seq_len
    )


def document_primed_figures(
    model: GPT, tokenizer: Tokenizer, config: FinetuneConfig, pairs: PairSet, seq_len: int
) -> dict[str, float]:
    """The held-out table's document row (tasks/finetune_priming.py): completion loss, parse
    rate, and the mean number of examples that fit (`primed_document_examples`)."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    special = special_ids(tokenizer)
    examples = priming_order(pairs.train, config.seed)
    laid_out = document_requests(
        examples, pairs.val, encode, config.priming_shots, seq_len, config.eval_max_new_tokens, special
    )
    requests = [request for request, _ in laid_out]
    # A completion longer than a row is not scored, as the `<|sep|>` rows drop it (`encode_pair`).
    fitting = [request for request in requests if len(request[1]) <= seq_len]
    scored = score_requests(
        model, fitting, seq_len, config.micro_batch_size, ("finetune", "completion loss, document-primed")
    )
    tokens = sum(len(completion) for _, completion in fitting)
    loss = -sum(result.logprob for result in scored) / tokens if tokens else math.nan
    figures = {"completion_loss": loss, "completion_perplexity": math.exp(loss)}
    if config.task == DOCSTRING_TASK:
        shown = config.eval_pairs
        prompts = [context for context, _ in requests[:shown]]
        figures["parse_rate"] = parse_rate(
            model,
            tokenizer,
            pairs.val[:shown],
            config.eval_max_new_tokens,
            prompts,
            "parse rate, document-primed",
            until_function_end=True,
        )
    figures["examples"] = sum(used for _, used in laid_out) / len(laid_out)
    return {f"primed_document_{name}": value for name, value in figures.items()}


def held_out_table(metrics: Mapping[str, float]) -> str:
    """The held-out table as Markdown: zero-shot, primed and fine-tuned rows, where measured."""
    lines = ["| model | completion loss | parse rate |", "|---|---|---|"]
    for prefix, label in HELD_OUT_ROWS.items():
        if f"{prefix}_completion_loss" not in metrics:
            continue
        if prefix.startswith("primed"):
            label += f" (mean {metrics[f'{prefix}_examples']:.2f} examples)"
        parse = metrics.get(f"{prefix}_parse_rate")
        loss = metrics[f"{prefix}_completion_loss"]
        lines.append(f"| {label} | {loss:.4f} | {'n/a' if parse is None else f'{parse:.3f}'} |")
    return "\n".join(lines) + "\n"


# --- the stage ----------------------------------------------------------------------


def finetune_inputs(
    model_sha256: str, tokenizer_sha256: str, pairs_sha256: str, shards: str | None = None
) -> dict[str, str]:
    """The identities fine-tuning depends on: the base weights, the tokenizer, the pairs' source,
    and the shards it replays, if any."""
    inputs = {"model": model_sha256, "tokenizer": tokenizer_sha256, "pairs": pairs_sha256}
    return inputs if shards is None else {**inputs, "shards": shards}


def replayed_shards(config: FinetuneConfig, tokenizer: Path, shards: Path | None) -> ShardManifest | None:
    """The manifest of the shards (`shards`, a manifest.json) whose train windows are replayed,
    or None: replay is off (with a message saying why, when the config asks for it)."""
    if config.replay_fraction == 0:
        return None
    if shards is None:
        print(f"finetune: replay_fraction {config.replay_fraction} is off: no pretraining shards", file=sys.stderr)
        return None
    manifest = ShardManifest.read(shards)
    if manifest.tokenizer_sha256 != sha256_file(tokenizer):
        print(
            f"finetune: replay_fraction {config.replay_fraction} is off: {shards} was encoded with another "
            f"tokenizer than the model's ({tokenizer})",
            file=sys.stderr,
        )
        return None
    return manifest


def finetune_fingerprint(config: FinetuneConfig, inputs: dict[str, str], block_size: int) -> str:
    """`inputs`: sha256 of the base weights ("model"), the tokenizer and the pairs' source file."""
    settings = {**config.settings(), "seq_len": config.seq_len or block_size}
    return fingerprint("finetune", settings, inputs, FORMAT_VERSION)


def run_finetune(
    config: FinetuneConfig,
    base_model: str | Path,
    tokenizer: Path,
    corpus: Path,
    workspace: Path,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
    shards: Path | None = None,
) -> FinetuneOutput:
    """Fine-tune `base_model` (a checkpoint directory or `models:/...` URI) on the config's pairs.

    `tokenizer` is the pipeline's tokenizer.json and `corpus` its corpus Parquet (the source
    of the default task); `shards` the pretraining shards' manifest.json, replayed with the
    config's `replay_fraction`. `callback(step, metrics)` receives the engine's step metrics.
    A completed run with the same inputs is reused; an interrupted one resumes.
    """
    # On the training device from the start: the held-out figures before training run there too.
    base = load_model_source(base_model, tokenizer, resolve_device(config.device, "finetune.device"))
    block_size = base.model.config.block_size
    seq_len = config.seq_len or block_size
    if seq_len > block_size:
        raise UserError(f"finetune.seq_len: {seq_len} exceeds the model's context ({block_size})")
    source = pairs_source(config, corpus)
    replayed = replayed_shards(config, tokenizer, shards)
    shards_identity = replayed and (replayed.fingerprint or sha256_file(shards))
    inputs = finetune_inputs(base.digest, sha256_file(tokenizer), sha256_file(source), shards_identity)
    stage = StageDir(workspace, "finetune", finetune_fingerprint(config, inputs, block_size))

    def train_pairs() -> Trained:
        pairs = load_pairs(config, corpus)
        write_pairs(pairs.train, stage.path / "pairs-train.parquet")
        write_pairs(pairs.val, stage.path / "pairs-val.parquet")
        tok = load_tokenizer(tokenizer)
        data = TaskData.encode(tok, pairs, seq_len, config, source)

        model = base.model
        metrics = held_out_figures(model, tok, config, pairs.val, data.val_rows, "pretrained") if data.has_val else {}
        if data.has_val and config.priming_shots:
            metrics |= primed_figures(model, tok, config, pairs, seq_len)
        env = DistributedEnv.from_environ()
        windows = replay_rows(config.replay_fraction, config.micro_batch_size) if replayed else 0
        train_data = PairBatches(
            *data.train_rows,
            config.micro_batch_size - windows,
            seed=config.seed,
            rank=env.rank,
            world_size=env.world_size,
        )
        if windows:
            replay = WindowLoader(shards, "train", windows, rank=env.rank, world_size=env.world_size, seed=config.seed)
            train_data = ReplayBatches(train_data, replay)
        # The engine's periodic validation only when asked for: the held-out figures
        # after training already give the final completion loss.
        periodic_validation = data.has_val and config.eval_every > 0
        val_data = (
            list(
                islice(
                    PairBatches(
                        *data.val_rows, config.micro_batch_size, shuffle=False, rank=env.rank, world_size=env.world_size
                    ),
                    config.eval_batches,
                )
            )
            if periodic_validation
            else None
        )
        with mirrored_checkpoints(stage, resume=config.resume):
            result = train(model, config.train_config(), train_data, val_data, stage.path, callback)
        if data.has_val:
            metrics |= held_out_figures(model, tok, config, pairs.val, data.val_rows, "finetuned")
        metrics |= data.figures() | {"train_loss": result.train_loss}
        # The final checkpoint carries its tokenizer, and says it is prompted as `prompt <|sep|>`.
        tokens = CheckpointTokens(special_ids=special_ids(tok), prompt_format="pair")
        attached = attach_tokenizer(result.checkpoint, tokenizer, tokens)
        files = ["pairs-train.parquet", "pairs-val.parquet", *(p.relative_to(stage.path).as_posix() for p in attached)]
        return Trained(checkpoint=result.checkpoint, metrics=metrics, files=files, runtime=result.runtime)

    return train_once(stage, FinetuneOutput, FORMAT_VERSION, inputs, config.resume, train_pairs)


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(
    config: FinetuneConfig,
    base_model: str | Path,
    tokenizer: Path,
    corpus: Path,
    workspace: Path,
    parent_run_id: str,
    shards: Path | None = None,
) -> FinetuneOutput:
    """`run_finetune` in a nested MLflow run: step metrics live, figures at the end."""
    params = {"finetune": config.model_dump(mode="json"), "base_model": str(base_model)}
    with stage_run(parent_run_id, "finetune", params, system_metrics=True) as stage:
        log_attempt(stage.run_id)
        with (
            live_loss_curves(stage, "finetune"),
            training_progress("finetune", config.max_steps, get_run_logger().info) as progress,
            step_metrics(stage.run_id, progress.update) as on_step,
        ):
            output = run_finetune(config, base_model, tokenizer, corpus, workspace, callback=on_step, shards=shards)
        if not output.reused:  # the checkpoints this run wrote and kept
            tracking.log_checkpoints(stage.run_id, "finetune", checkpoint_dirs(output.checkpoint.parent))
        if output.runtime is not None:
            tracking.log_params(stage.run_id, {"runtime": output.runtime.model_dump()})
        stage.finish(
            output.metrics,
            parent_metrics={name: output.metrics[name] for name in HEADLINE if name in output.metrics},
            artifacts={output.path / "metrics.json": "finetune"},
            report=Report(
                "finetune",
                metrics_markdown(f"Fine-tuning of {base_model}", output.metrics)
                + f"\n## Held-out pairs: priming against fine-tuning\n\n{held_out_table(output.metrics)}"
                + f"\nCheckpoint: `{output.checkpoint}`\n",
                "fine-tuning figures, pretrained vs fine-tuned",
            ),
        )
    return finished(output)
