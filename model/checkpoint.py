"""Training checkpoints: `<out_dir>/checkpoints/step-N/`.

    model.safetensors   the weights (safetensors: nothing is unpickled when loading them)
    config.json         the GPTConfig, so `load_model(dir)` rebuilds the model alone
    state.pt            optimizer state, step, loader position, RNG states; plain tensors and
                        containers only, read back with `torch.load(weights_only=True)`
    tokenizer.json      in a stage's final checkpoint (`attach_tokenizer`): the tokenizer, and
    tokens.json         its special ids and the prompt format the model was last trained on,
                        so the directory alone is enough to generate with or export it

A checkpoint is written into a hidden temporary directory and renamed into place, so a
`step-N` directory is always complete; only the newest `keep` are kept. Weights are saved
under the plain module's names (no `_orig_mod.` from torch.compile, no `module.` from DDP),
the tied head once (as safetensors' `save_model` does, the file's metadata naming the
alias), so a checkpoint loads into a model wrapped any other way. A sharded (FSDP2) model is
saved the same way, from its state gathered to rank 0 (`model.parallel.full_state`).

The opt-in sharded format (`checkpoint_format: dcp`) is for models too large to gather:
every rank writes its shards of the weights and optimizer state with
torch.distributed.checkpoint into `dcp/` instead of `model.safetensors`; state.pt keeps the
rest. DCP unpickles its `.metadata` file when loading, so read such checkpoints only from
storage you trust; the engine reads them only when the run asks for that format.
`consolidate` turns one into a `model.safetensors` in a single process.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict
from torch import nn

from model.config import GPTConfig
from model.errors import UserError
from model.gpt import GPT
from model.special_tokens import SpecialIds

if TYPE_CHECKING:
    # The training checkpoints' functions import model.parallel when called: it brings
    # torch.distributed's checkpoint and FSDP modules (a second), which loading a model to
    # generate from never needs.
    from model.parallel import CheckpointFormat, Optimizers

WEIGHTS, CONFIG, STATE, DCP = "model.safetensors", "config.json", "state.pt", "dcp"
TOKENIZER, TOKENS = "tokenizer.json", "tokens.json"
# How a model expects its prompts: "document" (pretrained: a prompt continues a document after
# <|endoftext|>) or "pair" (fine-tuned by gptflow: `prompt <|sep|>`, then it writes the completion).
PromptFormat = Literal["document", "pair"]
_STEP_DIR = re.compile(r"step-(\d+)")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP's `.module` and torch.compile's `._orig_mod` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_dirs(checkpoints: Path) -> list[Path]:
    """Complete `step-N` checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(checkpoint: Path) -> int:
    """The training step a `step-N` checkpoint directory holds."""
    return int(_STEP_DIR.fullmatch(checkpoint.name).group(1))


def latest_checkpoint(checkpoints: Path) -> Path | None:
    dirs = checkpoint_dirs(checkpoints)
    return dirs[-1] if dirs else None


def tied_names(model: nn.Module) -> dict[str, str]:
    """State-dict names whose tensor is another name's (the head tied to the embedding), each
    mapped to the name that files store it under: the first in sorted order, as `save_model` picks."""
    names = defaultdict(list)
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        names[id(tensor)].append(name)
    return {alias: min(group) for group in names.values() for alias in group if alias != min(group)}


def save_checkpoint(
    checkpoints: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: int,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `checkpoints/step-{step}` atomically, then delete all but the newest `keep`.

    `weights`: the model's full state dict, when its own parameters are shards (FSDP2)."""
    tmp = _fresh(checkpoints / f".step-{step}.tmp-{os.getpid()}")
    plain = unwrap(model)
    _write_weights(tmp / WEIGHTS, plain, plain.state_dict() if weights is None else weights)
    return _commit(tmp, checkpoints, step, plain, state, keep)


def save_sharded_checkpoint(
    checkpoints: Path, step: int, model: nn.Module, state: dict[str, Any], shards: dict[str, Any], keep: int
) -> Path:
    """The DCP format: every rank calls this with its `shards` (model.parallel.sharded_state) and
    writes them; rank 0 also writes the config and `state`, and commits."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    tmp = checkpoints / f".step-{step}.tmp-{DCP}"
    if main:
        _fresh(tmp)
    if dist.is_initialized():
        dist.barrier()  # the directory exists before any rank writes into it
    import torch.distributed.checkpoint as dcp  # here: a second to import (see TYPE_CHECKING above)

    dcp.save(shards, checkpoint_id=tmp / DCP)  # returns on every rank once all shards and the .metadata are written
    return _commit(tmp, checkpoints, step, unwrap(model), state, keep) if main else checkpoints / f"step-{step}"


def save_training_checkpoint(
    checkpoints: Path,
    step: int,
    model: nn.Module,
    optimizers: Optimizers,
    state: dict[str, Any],
    checkpoint_format: CheckpointFormat,
    keep: int,
    is_main: bool,
) -> Path:
    """The training loop's checkpoint of step `step`: the (parallelized) model's weights and
    optimizer state in `checkpoint_format`, plus `state`. Every rank calls it: gathering the
    state, or writing its shards, takes them all; no rank returns before the checkpoint is in place."""
    from model.parallel import full_state, sharded_state

    if checkpoint_format == "dcp":
        save_sharded_checkpoint(checkpoints, step, model, state, sharded_state(model, optimizers), keep=keep)
    else:
        weights, optimizer_state = full_state(model, optimizers)  # collective: every rank takes part
        if is_main:
            save_checkpoint(
                checkpoints, step, model, {"optimizer": optimizer_state, **state}, keep=keep, weights=weights
            )
    if dist.is_initialized():
        dist.barrier()
    return checkpoints / f"step-{step}"


def load_training_checkpoint(
    checkpoint: Path,
    model: nn.Module,
    optimizers: Optimizers,
    checkpoint_format: CheckpointFormat,
    is_main: bool,
) -> dict[str, Any]:
    """Load `checkpoint`'s weights and optimizer state into the (parallelized) model; returns the
    rest of its state. Rank 0 reads a gathered checkpoint and broadcasts it; a DCP checkpoint is
    read by every rank, and only when the run opted into that format."""
    from model.parallel import load_full_state, load_sharded_state, sharded_state

    state = load_state(checkpoint)
    if (checkpoint / DCP).is_dir():
        if checkpoint_format != "dcp":
            raise UserError(
                f"{checkpoint}: a sharded checkpoint (checkpoint_format: dcp), whose metadata is unpickled when "
                "read; set checkpoint_format: dcp to resume from it if you trust its storage, or delete it"
            )
        shards = sharded_state(model, optimizers)
        load_shards(checkpoint, shards)
        load_sharded_state(model, optimizers, shards)
    else:
        weights = read_weights(checkpoint, model) if is_main else {}
        load_full_state(model, optimizers, weights, state["optimizer"] if is_main else {})
    return state


def _fresh(tmp: Path) -> Path:
    """Create the temporary directory `tmp`, first removing half-written checkpoints of a
    process that was killed: never loaded, only in the way."""
    for stale in tmp.parent.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _write_weights(path: Path, plain: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    aliases = tied_names(plain)
    stored = {name: tensor.contiguous() for name, tensor in weights.items() if name not in aliases}
    safetensors.torch.save_file(stored, path, metadata=aliases or None)


def _commit(tmp: Path, checkpoints: Path, step: int, plain: nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Add the config and the state to `tmp`, rename it to `step-{step}`, drop all but the newest `keep`."""
    (tmp / CONFIG).write_text(plain.config.model_dump_json(indent=2) + "\n")
    torch.save({"step": step, **state}, tmp / STATE)
    final = checkpoints / f"step-{step}"
    if final.exists():  # the same step saved again (a resumed run that stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(checkpoints)[:-keep]:
        shutil.rmtree(old)
    return final


def read_weights(checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """`checkpoint`'s weights as `model`'s full state dict, tied names included."""
    if not (checkpoint / WEIGHTS).is_file() and (checkpoint / DCP).is_dir():
        raise UserError(
            f"{checkpoint}: a sharded checkpoint (checkpoint_format: dcp) without {WEIGHTS}; if you trust the "
            "storage it comes from, model.checkpoint.consolidate() writes the weights file"
        )
    try:
        weights = safetensors.torch.load_file(checkpoint / WEIGHTS)
    except safetensors.SafetensorError as e:
        raise UserError(f"{checkpoint / WEIGHTS}: not a readable safetensors file ({e})") from None
    for alias, name in tied_names(model).items():
        if name in weights:
            weights.setdefault(alias, weights[name])
    expected = unwrap(model).state_dict().keys()
    if weights.keys() != expected:
        raise UserError(
            f"{checkpoint / WEIGHTS}: does not match the model (missing {sorted(expected - weights.keys())[:5]}, "
            f"unexpected {sorted(weights.keys() - expected)[:5]})"
        )
    return weights


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load `checkpoint`'s weights into `model` (plain, compiled or DDP-wrapped)."""
    unwrap(model).load_state_dict(read_weights(checkpoint, model))


def load_shards(checkpoint: Path, shards: dict[str, Any]) -> None:
    """Fill `shards` (model.parallel.sharded_state) in place from a DCP checkpoint, on any number
    of ranks. Unpickles the checkpoint's .metadata: trusted storage only."""
    import torch.distributed.checkpoint as dcp  # here: a second to import (see TYPE_CHECKING above)

    dcp.load(shards, checkpoint_id=checkpoint / DCP)


def load_state(checkpoint: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The training state saved with the weights (optimizer, step, loader, RNG).

    `weights_only=True` unpickles tensors and plain containers only: a state file carrying
    anything else (code to run, e.g. a planted `__reduce__`) is refused before it runs.
    Memory-mapped: under torchrun every rank reads the step, loader and RNG state, and only
    rank 0 the optimizer state (which it then broadcasts)."""
    try:
        return torch.load(checkpoint / STATE, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{checkpoint / STATE}: refused: it holds objects other than tensors and plain values, "
            "and loading them could run code; delete this checkpoint"
        ) from None


class CheckpointTokens(BaseModel):
    """A checkpoint's tokens.json: the special ids of its tokenizer.json and its prompt format."""

    model_config = ConfigDict(extra="forbid")

    special_ids: SpecialIds
    prompt_format: PromptFormat


def save_model_directory(model: nn.Module, directory: Path) -> Path:
    """Write `model`'s weights and config.json into `directory` (a checkpoint without training
    state, e.g. a pretrained model to start from); `load_model(directory)` reads it back."""
    directory.mkdir(parents=True, exist_ok=True)
    plain = unwrap(model)
    _write_weights(directory / WEIGHTS, plain, plain.state_dict())
    (directory / CONFIG).write_text(plain.config.model_dump_json(indent=2) + "\n")
    return directory


def attach_tokenizer(checkpoint: Path, tokenizer: Path, tokens: CheckpointTokens) -> list[Path]:
    """Copy `tokenizer` (a tokenizer.json) into `checkpoint` with its tokens.json; returns both paths."""
    for name, text in ((TOKENIZER, Path(tokenizer).read_text()), (TOKENS, tokens.model_dump_json(indent=2) + "\n")):
        tmp = checkpoint / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, checkpoint / name)
    return [checkpoint / TOKENIZER, checkpoint / TOKENS]


def read_tokens(checkpoint: Path) -> CheckpointTokens:
    """`checkpoint`'s tokens.json; a checkpoint without one predates self-contained checkpoints."""
    path = checkpoint / TOKENS
    if not path.is_file() or not (checkpoint / TOKENIZER).is_file():
        raise UserError(
            f"{checkpoint}: has no {TOKENIZER} and {TOKENS}; only a stage's final checkpoint carries its "
            "tokenizer (rerun the stage, or name the stage directory)"
        )
    try:
        return CheckpointTokens.model_validate_json(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not a readable tokens file ({e})") from None


def read_config(checkpoint: Path) -> GPTConfig:
    try:
        return GPTConfig.model_validate(json.loads((checkpoint / CONFIG).read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"{checkpoint / CONFIG}: not a readable model config ({e})") from None


def load_model(checkpoint: Path, device: torch.device | str = "cpu") -> GPT:
    """A GPT built from `checkpoint`'s config.json with its weights: e.g. the pretrained model to fine-tune."""
    checkpoint = Path(checkpoint)
    model = GPT(read_config(checkpoint))
    load_weights(model, checkpoint)
    return model.to(device)


def consolidate(checkpoint: Path) -> Path:
    """Write `model.safetensors` into a DCP checkpoint from its shards, in this one process (which
    must hold the whole model), so that evaluation, fine-tuning and export can read it.
    Unpickles the checkpoint's .metadata: trusted storage only."""
    checkpoint = Path(checkpoint)
    model = GPT(read_config(checkpoint))
    weights = model.state_dict()  # shares the parameters' storage: DCP loads into the model
    load_shards(checkpoint, {"model": weights})
    tmp = checkpoint / f".{WEIGHTS}.tmp-{os.getpid()}"
    _write_weights(tmp, model, weights)
    os.replace(tmp, checkpoint / WEIGHTS)
    return checkpoint / WEIGHTS
