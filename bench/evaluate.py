"""Benchmark: evaluation throughput, and the default fine-tuning task before and after.

    python bench/evaluate.py                       # the embedded default, configs/tiny.yaml
    python bench/evaluate.py --model models:/tiny-stdlib@champion
    python bench/evaluate.py --quick               # a few steps, only checks that it runs

Runs the pipeline's stages as plain functions in the config's workspace, so stages that
`gptflow run` already built are reused: data preparation, the pretrained model (unless
`--model` names one), then

- eval tokens/s on the val shards (the windows the evaluate stage scores, forward passes
  and loss, best of two passes) and on the held-out documents' sliding windows;
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
from collections.abc import Callable
from pathlib import Path

from flows.pipeline_config import load_config
from flows.prepare import prepare_data_locally
from model.scoring import LossTotals, score_batches, sliding_window_batches, val_windows, window_batches
from tasks.bpe import load_tokenizer, token_byte_lengths
from tasks.evaluate import document_stride, held_out_documents
from tasks.finetune import run_finetune
from tasks.models.sources import load_model_source
from tasks.pretrain import run_pretrain

QUICK = [
    "pretrain.max_steps=3",
    "pretrain.checkpoint_every=0",
    "finetune.max_steps=3",
    "finetune.eval_pairs=4",
    "finetune.eval_max_new_tokens=8",
    "evaluate.max_documents=2",
    "evaluate.max_windows=16",
]


def timed(score: Callable[[], LossTotals], repeats: int = 2) -> tuple[float, LossTotals]:
    """Tokens scored per second by `score()`, best of `repeats`, and its totals."""
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        totals = score()
        best = max(best, totals.tokens / (time.perf_counter() - started))
    return best, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument(
        "--model", help="checkpoint directory or models:/NAME@ALIAS; default: the config's pretraining output"
    )
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

    windows = val_windows(shards, config.evaluate.max_windows)
    byte_lengths = token_byte_lengths(tokenizer, model.config.vocab_size)
    batch = config.evaluate.batch_size
    block = model.config.block_size
    stride = document_stride(config.evaluate, block)
    documents = held_out_documents(corpus, tokenizer, config.evaluate.max_documents)
    val_speed, val = timed(lambda: score_batches(model, window_batches(windows, batch), byte_lengths))
    doc_speed, docs = timed(
        lambda: score_batches(model, sliding_window_batches(documents, block, stride, batch), byte_lengths)
    )
    print(f"\neval throughput (batch {batch}, {len(windows)} val windows, {len(documents)} held-out documents)")
    print(f"  {'val shards':<32} {val_speed:>10,.0f} tokens/s")
    print(f"  {f'documents, sliding (stride {stride})':<32} {doc_speed:>10,.0f} scored tokens/s")

    print("\nevaluation (the evaluate stage's figures)")
    for name, value in {**val.figures("val"), **docs.figures("doc")}.items():
        print(f"  {name:<22} {value:>12.4f}")

    started = time.perf_counter()
    finetuned = run_finetune(config.finetune, base, tokenizer_path, corpus, config.workspace)
    seconds = time.perf_counter() - started
    m = finetuned.metrics
    print(
        f"\nfine-tuning, task {config.finetune.task}: {m['train_pairs']:.0f} train / {m['val_pairs']:.0f} "
        f"held-out pairs, {config.finetune.max_steps} steps"
        + (" (reused: built earlier)" if finetuned.reused else f", {seconds:.0f} s")
    )
    print(f"  {'held-out figure':<24} {'pretrained':>12} {'fine-tuned':>12}")
    for figure in ("completion_loss", "completion_perplexity", "parse_rate"):
        if f"pretrained_{figure}" in m:
            print(f"  {figure:<24} {m[f'pretrained_{figure}']:>12.4f} {m[f'finetuned_{figure}']:>12.4f}")
    print(
        f"  (parse rate over {min(config.finetune.eval_pairs, int(m['val_pairs']))} pairs, "
        f"greedy, at most {config.finetune.eval_max_new_tokens} new tokens)"
    )
    if args.quick:
        print("\n--quick: a few training steps and a few documents; these figures only show that the benchmark runs")


if __name__ == "__main__":
    main()
