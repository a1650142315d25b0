"""Benchmark: evaluation throughput, and the default fine-tuning task before and after.

    python bench/evaluate.py                       # the embedded default, configs/tiny.yaml
    python bench/evaluate.py --model models:/tiny-stdlib@champion
    python bench/evaluate.py --quick               # a few steps, only checks that it runs

Runs the pipeline's stages as plain functions in the config's workspace, so stages that
`gptflow run` already built are reused: data preparation, the pretrained model (unless
`--model` names one), then

- eval tokens/s on the val shards (forward passes only, every window, timed twice: the
  first pass warms up) and on the held-out documents' sliding windows;
- the evaluation figures (val and held-out documents);
- the fine-tuning stage on the default task, "docstring -> function": completion loss,
  perplexity and the share of generated bodies that parse, pretrained vs fine-tuned.

`--quick` shrinks pretraining and fine-tuning to a few steps and the evaluation to a few
documents and pairs (stage directories of their own, by fingerprint, in the same
workspace): its figures say nothing about the model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flows.config import load_config
from flows.prepare import prepare_data_locally
from model.evaluate import score_batches, sliding_window_batches
from tasks.bpe import load_tokenizer
from tasks.evaluate import (
    document_figures, held_out_documents, shard_figures, shard_windows, token_byte_lengths, window_batches,
)
from tasks.finetune import run_finetune
from tasks.model_source import load_model_source
from tasks.pretrain import run_pretrain

QUICK = [
    "pretrain.max_steps=3", "pretrain.checkpoint_every=0",
    "finetune.max_steps=3", "finetune.eval_pairs=4", "finetune.eval_max_new_tokens=8",
    "evaluate.max_documents=2",
]


def timed_tokens_per_s(score, repeats: int = 2) -> float:
    """Tokens scored per second by `score()` (which returns LossTotals), best of `repeats`."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        totals = score()
        best = max(best, totals.tokens / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--model", help="checkpoint directory or models:/NAME@ALIAS; default: the config's pretraining output")
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks that the script runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override dotted.key=value")
    args = parser.parse_args()
    overrides = args.overrides + (QUICK if args.quick else [])
    config = load_config(args.config, overrides)

    prepared = prepare_data_locally(config)
    tokenizer_path, shards, corpus = prepared.tokenizer.tokenizer, prepared.shards.path, prepared.corpus.corpus
    base = args.model or run_pretrain(config.pretrain, config.model, prepared.shards, config.workspace).checkpoint
    model = load_model_source(base, tokenizer_path).model
    tokenizer = load_tokenizer(tokenizer_path)
    print(f"model {base}: {model.config.num_params():,} parameters, context {model.config.block_size}")

    windows, _ = shard_windows(shards)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    batch = config.evaluate.batch_size
    block = model.config.block_size
    stride = config.evaluate.stride or block // 2
    documents = held_out_documents(corpus, tokenizer, config.evaluate.max_documents)
    val_speed = timed_tokens_per_s(lambda: score_batches(model, window_batches(windows, batch), byte_lengths))
    doc_speed = timed_tokens_per_s(
        lambda: score_batches(model, sliding_window_batches(documents, block, stride, batch), byte_lengths)
    )
    print(f"\neval throughput (batch {batch}, {len(windows)} val windows, {len(documents)} held-out documents)")
    print(f"  val shards            {val_speed:>10,.0f} tokens/s")
    print(f"  sliding windows (stride {stride})  {doc_speed:>10,.0f} scored tokens/s")

    figures = {**shard_figures(model, tokenizer, config.evaluate, shards),
               **document_figures(model, tokenizer, config.evaluate, corpus)}
    print("\nevaluation")
    for name, value in figures.items():
        if name != "eval_tokens_per_s":
            print(f"  {name:<22} {value:>12.4f}")

    started = time.perf_counter()
    finetuned = run_finetune(config.finetune, base, tokenizer_path, corpus, config.workspace)
    seconds = time.perf_counter() - started
    m = finetuned.metrics
    print(f"\nfine-tuning, task {config.finetune.task}: {m['train_pairs']:.0f} train / {m['val_pairs']:.0f} "
          f"held-out pairs, {config.finetune.max_steps} steps"
          + (" (reused: built earlier)" if finetuned.reused else f", {seconds:.0f} s"))
    print(f"  {'held-out figure':<24} {'pretrained':>12} {'fine-tuned':>12}")
    for figure in ("completion_loss", "completion_perplexity", "parse_rate"):
        if f"pretrained_{figure}" in m:
            print(f"  {figure:<24} {m[f'pretrained_{figure}']:>12.4f} {m[f'finetuned_{figure}']:>12.4f}")
    print(f"  (parse rate over {min(config.finetune.eval_pairs, int(m['val_pairs']))} pairs, "
          f"greedy, at most {config.finetune.eval_max_new_tokens} new tokens)")
    if args.quick:
        print("\n--quick: a few steps on a fresh workspace; these figures only show that the benchmark runs")


if __name__ == "__main__":
    main()
