"""Completions of text prompts by a `SourceModel`: what `gptflow generate` prints.

Each prompt is laid out as the model expects (model/prompts.py): primed with examples when
given, else in the model's own prompt format (a model gptflow fine-tuned: `prompt <|sep|>`;
any other: a document after `<|endoftext|>`). A prompt longer than `block_size -
max_new_tokens` tokens keeps its end and reports how many tokens were dropped; primed
examples that do not all fit are refused, saying how many do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.checkpoint import PromptFormat
from model.generate import generate
from model.prompts import prompt_rows
from tasks.models.sources import SourceModel


@dataclass
class Completion:
    prompt: str
    text: str
    dropped_tokens: int  # cut from the start of the prompt to leave room for max_new_tokens
    examples_used: int = 0  # primed with this many examples


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float = 1.0
    seed: int | None = None


def complete(
    source: SourceModel,
    prompts: list[str],
    sampling: Sampling,
    examples: list[tuple[str, str]] | None = None,
    prompt_format: PromptFormat | None = None,
    on_text: Callable[[int, str], None] | None = None,
    examples_source: str = "examples",
    shots: int | None = None,
) -> list[Completion]:
    """Complete each prompt; `prompt_format` None: the model's own, and examples as pairs;
    "document" lays examples out as document text too (model/prompts.py). `on_text(i, text)` receives
    prompt i's completion as it grows, piece by piece (streaming).

    `examples` must all fit the context with each prompt; with `shots`, each prompt is primed
    with the first `shots` of them that fit instead (the priming of the held-out table)."""
    tokenizer, special = source.tokenizer, source.special

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    rows = prompt_rows(
        prompts,
        encode,
        special,
        prompt_format or source.prompt_format,
        source.model.config.block_size,
        sampling.max_new_tokens,
        examples,
        shots,
        examples_source,
        primed_as=prompt_format or "pair",  # examples follow an explicit format; the model's own: pairs
    )
    drawn: list[list[int]] = [[] for _ in prompts]
    shown = [""] * len(prompts)

    def stream(row: int, token: int) -> None:
        drawn[row].append(token)
        text = tokenizer.decode(drawn[row], skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character's bytes still arriving: wait for the rest
            on_text(row, text[len(shown[row]) :])
            shown[row] = text

    completions = generate(
        source.model,
        [row.ids for row in rows],
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k or None,
        top_p=sampling.top_p,
        eos_id=special.eos,
        seed=sampling.seed,
        on_token=stream if on_text is not None else None,
    )
    return [
        Completion(text, tokenizer.decode(tokens, skip_special_tokens=True), row.dropped_tokens, row.examples_used)
        for text, tokens, row in zip(prompts, completions, rows)
    ]
