"""Fine-tuning with replay: the task's parse rate against the general val bits per byte, per replay_fraction.

    python bench/replay.py                                  # configs/tiny.yaml, fractions 0 and the default
    python bench/replay.py --fractions 0,0.25,0.5 --model workspace/pretrain/<fingerprint>
    python bench/replay.py --quick                          # a few steps: only checks that it runs

Runs the pipeline's stages as plain functions in the config's workspace (stages built before
are reused): data preparation, the pretrained model (unless `--model` names one), then the
fine-tuning stage once per fraction, with the pretraining shards replayed. For the pretrained
model and each fine-tuned one it prints the general val bits per byte (the evaluate stage's
`val_bits_per_byte`: the val shards' windows) and, on the held-out pairs, the completion loss
and the parse rate. A fraction is a good default when the parse rate rises and the val bits
per byte rises by less than 2%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.pipeline_config import load_config  # noqa: E402
from flows.prepare import prepare_data_locally  # noqa: E402
from tasks.bpe import load_tokenizer  # noqa: E402
from tasks.evaluate import shard_figures  # noqa: E402
from tasks.finetune import run_finetune  # noqa: E402
from tasks.models.sources import load_model_source  # noqa: E402
from tasks.pretrain import run_pretrain  # noqa: E402

QUICK = ["pretrain.max_steps=3", "finetune.max_steps=3", "finetune.eval_pairs=4", "evaluate.max_windows=16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"))
    parser.add_argument("--model", help="checkpoint directory; default: the config's pretraining output")
    parser.add_argument("--fractions", help="comma-separated replay fractions; default: 0 and the config's")
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks that the script runs")
    args = parser.parse_args()
    config = load_config(args.config, QUICK if args.quick else [])
    if config.finetune is None:
        raise SystemExit(f"error: {args.config}: no finetune section")
    fractions = (
        [float(f) for f in args.fractions.split(",")] if args.fractions else [0.0, config.finetune.replay_fraction]
    )

    prepared = prepare_data_locally(config)
    tokenizer_path, shards, corpus = prepared.tokenizer.tokenizer, prepared.shards, prepared.corpus.corpus
    base = args.model or run_pretrain(config.pretrain, config.model, shards, config.workspace).checkpoint
    tokenizer = load_tokenizer(tokenizer_path)

    def val_bits_per_byte(checkpoint: str | Path) -> float:
        model = load_model_source(checkpoint, tokenizer_path).model
        return shard_figures(model, tokenizer, config.evaluate, shards.path)["val_bits_per_byte"]

    pretrained = val_bits_per_byte(base)
    print(f"model {base}; general val bits/byte over the val shards' windows (max {config.evaluate.max_windows})")
    print(f"{'model':<24} {'val bits/byte':>13} {'change':>8} {'completion loss':>16} {'parse rate':>11}")
    for i, fraction in enumerate(fractions):
        finetune = config.finetune.model_copy(update={"replay_fraction": fraction})
        output = run_finetune(finetune, base, tokenizer_path, corpus, config.workspace, shards=shards.manifest)
        m = output.metrics
        if i == 0:  # the stage measures the pretrained model on the held-out pairs too
            print(
                f"{'pretrained':<24} {pretrained:>13.4f} {'':>8} {m['pretrained_completion_loss']:>16.4f} "
                f"{m['pretrained_parse_rate']:>11.1%}"
            )
        bits = val_bits_per_byte(output.checkpoint)
        print(
            f"{f'fine-tuned, replay {fraction:g}':<24} {bits:>13.4f} {bits / pretrained - 1:>+8.1%} "
            f"{m['finetuned_completion_loss']:>16.4f} {m['finetuned_parse_rate']:>11.1%}",
            flush=True,
        )
    print(
        f"\n{config.finetune.max_steps} fine-tuning steps; parse rate over {config.finetune.eval_pairs} held-out pairs"
    )
    if args.quick:
        print("--quick: a few steps; these figures only show that the benchmark runs")


if __name__ == "__main__":
    main()
