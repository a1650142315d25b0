"""Generation speed: tokens/s with and without the KV cache, and against Hugging Face's cached generate.

A 4-layer, 256-wide GPT with a 512-token context (random weights: speed does not depend on
them) writes 256 new tokens after a 16-token prompt, at batch 1 and batch 8. `--prompt-length
192 --block-size 256 --new-tokens 64` is fine-tuning's parse rate on `make run`'s model instead:
prompts that leave the context just the room for the new tokens. Hugging Face's
GPT2LMHeadModel gets the same weights through `export_hf` and the same sampling (top-k 40).
Each figure is the median of several runs, with their range.

    .venv/bin/python bench/generate.py            # the figures (run on a quiet machine)
    .venv/bin/python bench/generate.py --quick    # a smoke check that everything runs

Targets (issue 3): cached >= 2.5x uncached; cached not slower than Hugging Face's cached generate.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from model.config import GPTConfig  # noqa: E402
from model.export import export_hf  # noqa: E402
from model.generate import generate  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.special_tokens import SpecialIds  # noqa: E402


def timed_runs(run: Callable[[], None], repeats: int) -> list[float]:
    run()  # warm-up: allocator, kernels, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main(
    new_tokens: int = typer.Option(256, help="tokens generated per prompt"),
    repeats: int = typer.Option(5, help="timed runs per figure (the median is reported)"),
    vocab_size: int = typer.Option(8192, help="vocabulary size (the tiny preset's)"),
    prompt_length: int = typer.Option(16, help="tokens per prompt"),
    block_size: int = typer.Option(512, help="the model's context"),
    quick: bool = typer.Option(False, help="smoke check: 8 new tokens, 1 repeat"),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)"),
) -> None:
    from transformers import GPT2LMHeadModel  # benchmark-only dependency (the `test` extra)

    if quick:
        new_tokens, repeats = 8, 1
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=4, n_head=4, n_embd=256)
    model = GPT(config).eval()
    special = SpecialIds(eos=0, pad=1, sep=2)  # a trained tokenizer's ids; only config.json reads them
    with tempfile.TemporaryDirectory() as directory:
        hf_model = GPT2LMHeadModel.from_pretrained(export_hf(model, directory, special)).eval()

    threads_used = torch.get_num_threads()
    title = f"{new_tokens} new tokens after {prompt_length}, 4x256 GPT, block_size {block_size}, {threads_used} threads"
    table = Table(title=title)
    for column in ("implementation", "batch", "tokens/s (median)", "range"):
        table.add_column(column, justify="right" if column != "implementation" else "left")

    for batch in (1, 8):
        prompts = torch.randint(3, vocab_size, (batch, prompt_length))

        def ours(use_cache: bool) -> Callable[[], None]:
            return lambda: generate(model, prompts.tolist(), new_tokens, top_k=40, use_cache=use_cache, seed=0)

        def hugging_face() -> None:
            with torch.inference_mode():
                hf_model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    do_sample=True,
                    top_k=40,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                )

        for name, run in (
            ("gptflow cached", ours(True)),
            ("gptflow uncached", ours(False)),
            ("HF GPT2LMHeadModel cached", hugging_face),
        ):
            rates = [batch * new_tokens / seconds for seconds in timed_runs(run, repeats)]
            table.add_row(name, str(batch), f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
