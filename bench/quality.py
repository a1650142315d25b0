"""Model quality at equal wall clock: the default recipe (configs/tiny.yaml) against a GPT-2 baseline.

    python bench/quality.py                                   # 600 s of training per run, 2 rounds
    python bench/quality.py --budget 90 --variant muon:pretrain.optimizer=muon --variant ...
    python bench/quality.py --quick                           # seconds: only checks that it runs

The baseline is the recipe of GPT-2 reproductions such as nanoGPT on the tiny preset: AdamW with
betas 0.9/0.95, weight decay 0.1 on matrices, lr 1e-3 warmed up linearly over the first 10% of
the steps then cosine-decayed to a tenth, batches of 16 x 256 tokens, gradients clipped at 1.0,
the 8,192-token vocabulary and 256-token windows. The default recipe is the config as it is;
each `--variant NAME:key=value,...` is the config with those overrides (to screen one lever).

The recipes take turns, round after round (the order reversed every other round), so that load
from other processes on a shared machine hits all of them alike. Before each run a short
calibration measures the recipe's step time, and the run's `max_steps` is set so that its whole
schedule (warmup, decay) ends within `--budget` seconds of training; the config's warmup keeps
its share of the steps. Each run starts from a fresh seeded model, trains without periodic
validation, and is then scored in bits per byte over the same held-out val documents (sliding
windows over the corpus' val split: tokenizers and window lengths compare). It prints steps,
tokens, training seconds and bits per byte of every run, then each recipe's mean and its gain
over the baseline of the same round, with the spread over rounds.

Data preparation runs in the config's workspace (stages built before are reused); the runs'
checkpoints go to a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.pipeline_config import PipelineConfig, load_config  # noqa: E402
from flows.prepare import prepare_data_locally  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.data import WindowLoader  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.train import TrainConfig, train  # noqa: E402
from tasks.bpe import load_tokenizer  # noqa: E402
from tasks.evaluate import EvaluateConfig, document_figures  # noqa: E402

# nanoGPT's GPT-2 recipe at the tiny preset's size; warmup: 10% of the steps (BASELINE_WARMUP).
BASELINE = [
    "bpe.vocab_size=8192",
    "shard.seq_len=256",
    "shard.stride=256",
    "pretrain.optimizer=adamw",
    "pretrain.lr=1e-3",
    "pretrain.min_lr=1e-4",
    "pretrain.schedule=cosine",
    "pretrain.batch_tokens=4096",
    "pretrain.weight_decay=0.1",
    "pretrain.beta1=0.9",
    "pretrain.beta2=0.95",
    "pretrain.grad_clip=1.0",
]
BASELINE_WARMUP = 0.1
CALIBRATION_STEPS = 6  # timed steps, after 2 warm-up ones (--quick: 1)
SAFETY = 0.95  # of the budget planned for: the machine's load moves between calibration and run
QUICK_DATA = ("bpe.", "shard.")  # --quick keeps the config's (micro) data and model: only the training recipe


@dataclass
class Recipe:
    name: str
    config: PipelineConfig
    warmup_fraction: float  # share of the steps spent warming up


@dataclass
class Outcome:
    recipe: str
    round: int
    steps: int
    tokens: int
    seconds: float
    bits_per_byte: float


def recipes(path: Path, variants: list[str], quick: bool) -> list[Recipe]:
    """The baseline, the default (the config as it is) and each variant."""
    default = load_config(path)
    baseline_overrides = [o for o in BASELINE if not (quick and o.startswith(QUICK_DATA))]
    baseline = load_config(path, baseline_overrides)
    if not quick:  # the tiny preset itself, whatever the config changes in the model
        baseline = baseline.model_copy(update={"model": ModelConfig(preset="tiny")})
    chosen = [Recipe("baseline", baseline, BASELINE_WARMUP), Recipe("default", default, warmup_share(default))]
    for variant in variants:
        name, _, overrides = variant.partition(":")
        config = load_config(path, overrides.split(",") if overrides else [])
        chosen.append(Recipe(name, config, warmup_share(config)))
    return chosen


def warmup_share(config: PipelineConfig) -> float:
    return config.pretrain.warmup_steps / config.pretrain.max_steps


def engine_config(recipe: Recipe, steps: int) -> TrainConfig:
    """The recipe's training settings for a run of `steps` steps: no validation, one checkpoint at the end."""
    settings = recipe.config.pretrain.train_config()
    return settings.model_copy(
        update={
            "max_steps": steps,
            "warmup_steps": round(recipe.warmup_fraction * steps),
            "eval_every": 0,
            "checkpoint_every": 0,
            "checkpoint_minutes": 0,
            "keep_checkpoints": 1,
            "resume": False,
        }
    )


def fresh_model(recipe: Recipe, vocab_size: int) -> GPT:
    torch.manual_seed(recipe.config.pretrain.seed)
    return GPT(recipe.config.model.resolve(vocab_size))


def seconds_per_step(recipe: Recipe, manifest: Path, vocab_size: int, out: Path, timed_steps: int) -> float:
    """The median time of a training step of this recipe now, after 2 warm-up steps."""
    times: list[float] = []
    settings = engine_config(recipe, 2 + timed_steps)
    data = WindowLoader(manifest, "train", settings.micro_batch_size, seed=settings.seed)
    train(
        fresh_model(recipe, vocab_size),
        settings,
        data,
        None,
        out,
        callback=lambda step, metrics: (
            times.append(settings.batch_tokens / metrics["tokens_per_s"]) if step > 2 else None
        ),
    )
    return statistics.median(times)


def run_once(
    recipe: Recipe, round_: int, budget: float, documents: int | None, scratch: Path, calibration_steps: int
) -> Outcome:
    prepared = prepare_data_locally(recipe.config)
    manifest = prepared.shards.manifest
    vocab_size = load_tokenizer(prepared.tokenizer.tokenizer).get_vocab_size()
    out = scratch / f"{recipe.name}-{round_}"
    step_seconds = seconds_per_step(recipe, manifest, vocab_size, out / "calibration", calibration_steps)
    steps = max(1, int(SAFETY * budget / step_seconds))
    settings = engine_config(recipe, steps)
    model = fresh_model(recipe, vocab_size)
    data = WindowLoader(manifest, "train", settings.micro_batch_size, seed=settings.seed)
    started = time.perf_counter()
    result = train(model, settings, data, None, out / "run")
    seconds = time.perf_counter() - started
    evaluate = EvaluateConfig(max_documents=documents)
    figures = document_figures(model, load_tokenizer(prepared.tokenizer.tokenizer), evaluate, prepared.corpus.corpus)
    return Outcome(recipe.name, round_, result.steps, result.tokens, seconds, figures["doc_bits_per_byte"])


def summary(outcomes: list[Outcome], names: list[str]) -> None:
    baseline = {o.round: o.bits_per_byte for o in outcomes if o.recipe == "baseline"}
    print(f"\n{'recipe':<16} {'bits/byte (mean)':>17} {'gain vs baseline':>17} {'per round':>24}")
    for name in names:
        mine = [o for o in outcomes if o.recipe == name]
        gains = [1 - o.bits_per_byte / baseline[o.round] for o in mine]
        rounds = " ".join(f"{100 * g:+.1f}%" for g in gains)
        spread = f"{100 * statistics.mean(gains):+.1f}% ({100 * (max(gains) - min(gains)):.1f} pts)"
        print(f"{name:<16} {statistics.mean(o.bits_per_byte for o in mine):>17.4f} {spread:>17} {rounds:>24}")
    print("gain: 1 - bits/byte over the baseline's of the same round (positive: better); spread: max - min over rounds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations: every recipe runs once per round")
    parser.add_argument("--documents", type=int, help="held-out val documents scored; default: all")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,...: the config changed")
    parser.add_argument("--quick", action="store_true", help="seconds only: the config's data and model, 1 s runs")
    args = parser.parse_args()
    calibration_steps = CALIBRATION_STEPS
    if args.quick:
        args.budget, args.documents, calibration_steps = 1.0, 2, 1

    chosen = recipes(args.config, args.variant, args.quick)
    print(f"{args.config}: {len(chosen)} recipes, {args.rounds} rounds of {args.budget:.0f} s of training each")
    print(f"{'round':>5} {'recipe':<16} {'steps':>7} {'tokens':>11} {'seconds':>8} {'bits/byte':>10}")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="quality-") as scratch:
        for round_ in range(1, args.rounds + 1):
            order = chosen if round_ % 2 else chosen[::-1]
            for recipe in order:
                o = run_once(recipe, round_, args.budget, args.documents, Path(scratch), calibration_steps)
                outcomes.append(o)
                print(
                    f"{o.round:>5} {o.recipe:<16} {o.steps:>7,} {o.tokens:>11,} {o.seconds:>8.1f} "
                    f"{o.bits_per_byte:>10.4f}",
                    flush=True,
                )
    summary(outcomes, [r.name for r in chosen])
    if args.quick:
        print("\n--quick: 1-second runs of the config's own model; these figures only show that the benchmark runs")


if __name__ == "__main__":
    main()
