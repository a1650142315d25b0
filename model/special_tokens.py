"""Special tokens: their strings, and their ids, which always come from the tokenizer.

A tokenizer gptflow trains has them first (ids 0, 1, 2); a pretrained one (GPT-2) keeps
its own end of text (50256) and gets `<|pad|>` and `<|sep|>` added after its vocabulary
(tasks/models/hf_import.py). So no code uses fixed ids: it reads a `SpecialIds` from the
tokenizer (`special_ids`) or from a checkpoint's `special_tokens.json`.

Text that merely looks like a special token (a user typing "<|sep|>") is always encoded as
plain text, in training, evaluation, `gptflow generate` and the registered model alike
(`tasks.bpe.load_tokenizer`): only the ids gptflow places itself act as separators.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, NonNegativeInt

from model.errors import UserError

EOS = "<|endoftext|>"  # ends every document in the token stream
PAD = "<|pad|>"
SEP = "<|sep|>"  # between prompt and completion; between description and code in few-shot prompts

SPECIAL_TOKENS = [EOS, PAD, SEP]  # the order a trained tokenizer gives them ids in


class TokenLookup(Protocol):
    """What `special_ids` needs of a tokenizer (a `tokenizers.Tokenizer` has it)."""

    def token_to_id(self, token: str) -> int | None: ...


class SpecialIds(BaseModel):
    """The ids of the special tokens in one tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eos: NonNegativeInt
    pad: NonNegativeInt
    sep: NonNegativeInt


def special_ids(tokenizer: TokenLookup, source: str = "the tokenizer") -> SpecialIds:
    """The special ids of `tokenizer`; a tokenizer lacking one of them is refused, naming it."""
    ids = {}
    for field, token in zip(("eos", "pad", "sep"), SPECIAL_TOKENS):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise UserError(f"{source}: has no {token} token; gptflow needs {', '.join(SPECIAL_TOKENS)}")
        ids[field] = token_id
    return SpecialIds(**ids)
