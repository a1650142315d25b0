"""Training throughput and MFU of the engine, against this machine's measured fp32 matmul peak
and against a plain GPT-2 step written as nanoGPT's train.py runs it.

    python bench/train.py [--runs 5] [--steps 8] [--quick]

For each model it runs `model.train.train` (the real step: micro-batches, clipping, fused
AdamW, the per-step host sync) on random tokens, eager and fp32, one micro-batch per step,
`--runs` times from a fresh model, and reports the median over runs of each run's tokens/s
(the median of its timed steps) with their range, and MFU: the model's
training FLOPs per token (6N + 12·L·T·d, N without position embeddings) times tokens/s
over the fp32 matmul peak measured in the same run. Each engine run is paired with a run
of the plain step (bench/plain_step.py: whole logits, mean cross-entropy, AdamW) on the
same shapes, their steps interleaved one for one, and the ratio engine / plain is taken
per pair, so that load from other processes hits both sides alike. Then the loader's
tokens/s on the same machine and the ratio between the two.

Targets on a 2-core CPU (eager, fp32): MFU >= 70% for 6x384 (seq 256, batch 8) and >= 55%
for 4x256 (seq 256, batch 16); engine / plain step >= 1.1x on both; the loader >= 20x the
training tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import describe, find_manifest, loader_tokens_per_s, random_shards  # noqa: E402
from plain_step import plain_training_steps  # noqa: E402

from model.config import GPTConfig, preset  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.mfu import measure_matmul_flops  # noqa: E402
from model.train import TrainConfig, train  # noqa: E402

WARMUP_STEPS = 2


class RandomTokens:
    """Endless random batches: the `Batches` interface with no I/O in the way."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int):
        self.batch_size, self.seq_len, self.vocab_size = batch_size, seq_len, vocab_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            windows = torch.randint(self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
            yield windows[:, :-1], windows[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def timing_run(steps: int, batch_size: int, seq_len: int, device: str, compile: bool | None = None) -> TrainConfig:
    """The engine's settings for a timed run: one micro-batch per step, from scratch, no validation,
    only the final checkpoint."""
    return TrainConfig(
        max_steps=steps,
        batch_tokens=batch_size * seq_len,
        micro_batch_size=batch_size,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=0,
        checkpoint_minutes=0,
        keep_checkpoints=1,
        resume=False,
        device=device,
        compile=compile,
    )


def paired_tokens_per_s(config: GPTConfig, batch_size: int, seq_len: int, steps: int) -> tuple[float, float]:
    """Tokens/s of one engine run from a fresh model and of the plain step, their steps interleaved
    (engine step, plain step, ...: load from other processes hits both alike); each the median of
    its steps after the warm-up ones."""
    rates: list[float] = []
    plain_rates: list[float] = []
    plain = plain_training_steps(config, batch_size, seq_len, torch.device("cpu"), bf16=False, compile=False)

    def after_engine_step(step: int, metrics: dict[str, float]) -> None:
        plain_rate = next(plain)
        if step > WARMUP_STEPS:
            rates.append(metrics["tokens_per_s"])
            plain_rates.append(plain_rate)

    settings = timing_run(WARMUP_STEPS + steps, batch_size, seq_len, "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        train(
            GPT(config),
            settings,
            RandomTokens(batch_size, seq_len, config.vocab_size),
            None,
            Path(out_dir),
            callback=after_engine_step,
        )
    return statistics.median(rates), statistics.median(plain_rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="training runs per model (median and range)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: a micro model, 3 steps, a short loader run")
    args = parser.parse_args()

    tiny = preset("tiny")
    models = [  # (name, config, batch size, sequence length)
        ("tiny preset (4x256)", tiny, 16, 256),
        ("6x384", tiny.model_copy(update={"n_layer": 6, "n_head": 6, "n_embd": 384}), 8, 256),
    ]
    if args.quick:
        models = [("micro (2x32)", tiny.model_copy(update={"n_layer": 2, "n_head": 2, "n_embd": 32}), 4, 64)]
        args.runs, args.steps = 2, 3

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = [measure_matmul_flops(size=2048, seconds=1.0) for _ in range(1 if args.quick else 5)]
    peak = statistics.median(peaks)
    print(f"fp32 matmul peak: {describe([p / 1e9 for p in peaks], 'GFLOP/s')}")

    fastest = 0.0  # the loader must keep up with the hungriest model
    for name, config, batch_size, seq_len in models:
        rates, plain_rates = zip(
            *(paired_tokens_per_s(config, batch_size, seq_len, args.steps) for _ in range(args.runs))
        )
        mfu = [config.flops_per_token(seq_len) * rate / peak for rate in rates]
        ratios = [rate / plain_rate for rate, plain_rate in zip(rates, plain_rates)]
        fastest = max(fastest, statistics.median(rates))
        print(
            f"train {name}, batch {batch_size} x {seq_len}: {describe(rates)}; "
            f"MFU {statistics.median(mfu):.1%} (range {min(mfu):.1%} - {max(mfu):.1%})"
        )
        print(
            f"  plain nanoGPT step: {describe(plain_rates)}; engine / plain {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f} - {max(ratios):.2f}, target >= 1.1x)"
        )

    with tempfile.TemporaryDirectory() as scratch:
        manifest = None if args.quick else find_manifest()
        manifest = manifest or random_shards(Path(scratch), windows=500 if args.quick else 12_000)
        loader_rates = loader_tokens_per_s(
            manifest, runs=2 if args.quick else 5, max_batches=20 if args.quick else None
        )
    print(f"loader ({manifest.parent.name}): {describe(loader_rates)}")
    print(f"loader / training tokens/s (fastest model): {statistics.median(loader_rates) / fastest:,.0f}x")


if __name__ == "__main__":
    main()
