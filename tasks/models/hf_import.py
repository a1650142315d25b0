"""Pretrained GPT-2 models from Hugging Face: a local directory or a hub name, as a GPT and its tokenizer.

A directory holds `config.json` (model_type gpt2), `model.safetensors` (the
`GPT2LMHeadModel` layout, or the hub `gpt2` layout without the `transformer.` prefix) and
`tokenizer.json`. Pickled weights (`pytorch_model.bin`) are refused: nothing is unpickled.
A hub name (`gpt2`, `gpt2-medium`, `org/name`) is fetched with `huggingface_hub` into its
cache, or taken from that cache when offline (`HF_HUB_OFFLINE=1`, or no network).

The model keeps its own end of text (GPT-2: 50256); `<|pad|>` and `<|sep|>` are added to its
tokenizer when missing, and the embedding grows by their rows (`model.export.grow_vocabulary`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from model.errors import UserError
from model.export import grow_vocabulary, import_hf
from model.gpt import GPT
from model.integrity import sha256_file
from model.special_tokens import EOS, SPECIAL_TOKENS, SpecialIds, special_ids

HF_WEIGHTS, HF_CONFIG, HF_TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_FILES = [HF_CONFIG, HF_WEIGHTS, HF_TOKENIZER]  # all that is fetched from the hub (never a .bin)
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # `gpt2`, `openai-community/gpt2`


@dataclass
class PretrainedModel:
    model: GPT
    tokenizer: Tokenizer  # with <|pad|> and <|sep|>; serialises to the tokenizer.json to use with it
    special: SpecialIds
    digest: str  # sha256 over the weights and tokenizer files: the model by content, not by name
    origin: str  # the directory, or the hub name and its revision


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory (its config.json names a model_type), not a gptflow checkpoint."""
    try:
        return "model_type" in json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False


def load_pretrained(spec: str) -> PretrainedModel:
    """The GPT-2 model `spec` names: an existing directory, else a hub name (see the module docstring)."""
    path = Path(spec).expanduser()
    if path.exists():
        return load_hf_directory(path, origin=str(path))
    if not HUB_NAME.fullmatch(spec):
        raise UserError(f"{spec}: no such directory (and not a Hugging Face hub name)")
    directory, revision = hub_snapshot(spec)
    return load_hf_directory(directory, origin=f"{spec}@{revision}")


def hub_snapshot(name: str) -> tuple[Path, str]:
    """The local snapshot of hub model `name` (downloaded when online) and its revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        directory = Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{name}: not a directory, and not in the Hugging Face cache while offline; "
            "download it once with network access (or name a local directory)"
        ) from None
    except (HFValidationError, OSError) as e:  # a bad name, a missing repository, a network failure
        raise UserError(f"{name}: cannot fetch it from the Hugging Face hub ({e})") from None
    return directory, directory.name  # snapshots/<commit>


def load_hf_directory(directory: Path, origin: str) -> PretrainedModel:
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory; expected a Hugging Face GPT-2 model directory")
    if not (directory / HF_WEIGHTS).is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (directory / name).is_file()]
        if pickled:
            raise UserError(
                f"{directory}: has only pickled weights ({pickled[0]}), which gptflow does not load (unpickling "
                f"can run code); convert them to {HF_WEIGHTS} (transformers: save_pretrained)"
            )
        raise UserError(f"{directory}: has no {HF_WEIGHTS} (gptflow loads no pickled weights)")
    model = import_hf(directory)  # refuses other architectures, naming the config field
    if not (directory / HF_TOKENIZER).is_file():
        raise UserError(f"{directory}: has no {HF_TOKENIZER}; gptflow uses the model's own tokenizer with it")
    tokenizer = Tokenizer.from_file(str(directory / HF_TOKENIZER))
    tokenizer.encode_special_tokens = True  # typed special-token text stays plain text
    model, special = with_special_tokens(model, tokenizer, str(directory / HF_TOKENIZER))
    digest = hashlib.sha256(
        f"{sha256_file(directory / HF_WEIGHTS)} {sha256_file(directory / HF_TOKENIZER)}".encode()
    ).hexdigest()
    return PretrainedModel(model, tokenizer, special, digest, origin)


def with_special_tokens(model: GPT, tokenizer: Tokenizer, source: str) -> tuple[GPT, SpecialIds]:
    """Add `<|pad|>` and `<|sep|>` to `tokenizer` (in place) when missing, and grow `model` by
    their rows; the tokenizer must have GPT-2's end of text already."""
    if tokenizer.token_to_id(EOS) is None:
        raise UserError(f"{source}: has no {EOS} token; gptflow takes GPT-2 tokenizers, which end documents with it")
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
    special = special_ids(tokenizer, source)
    if missing:
        new_ids = [tokenizer.token_to_id(token) for token in missing]
        model = grow_vocabulary(model, tokenizer.get_vocab_size(with_added_tokens=True), new_ids)
    if max(special.eos, special.pad, special.sep) >= model.config.vocab_size:
        raise UserError(f"{source}: its special tokens have ids beyond the model's {model.config.vocab_size} rows")
    return model, special
