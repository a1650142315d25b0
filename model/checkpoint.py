"""Training checkpoints: `<out_dir>/checkpoints/step-N/`.

    model.safetensors   the weights (safetensors: nothing is unpickled when loading them)
    config.json         the GPTConfig, so `load_model(dir)` rebuilds the model alone
    state.pt            optimizer state, step, loader position, RNG states; plain tensors and
                        containers only, read back with `torch.load(weights_only=True)`

A checkpoint is written into a hidden temporary directory and renamed into place, so a
`step-N` directory is always complete; only the newest `keep` are kept. Weights are saved
from the plain module (no `_orig_mod.` from torch.compile, no `module.` from DDP), so a
checkpoint of a compiled model loads into an uncompiled one and back.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from model.config import GPTConfig
from model.errors import UserError
from model.gpt import GPT

WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "state.pt"
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


def latest_checkpoint(checkpoints: Path) -> Path | None:
    dirs = checkpoint_dirs(checkpoints)
    return dirs[-1] if dirs else None


def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step-{step}` atomically, then delete all but the newest `keep`."""
    final = checkpoints / f"step-{step}"
    tmp = checkpoints / f".step-{step}.tmp-{os.getpid()}"
    # Half-written checkpoints of a process that was killed: never loaded, only in the way.
    for stale in checkpoints.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain = unwrap(model)
    safetensors.torch.save_model(plain, str(tmp / WEIGHTS))  # stores the tied head/embedding once
    (tmp / CONFIG).write_text(plain.config.model_dump_json(indent=2) + "\n")
    torch.save({"step": step, **state}, tmp / STATE)
    if final.exists():  # the same step saved again (a resumed run that stopped at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(checkpoints)[:-keep]:
        shutil.rmtree(old)
    return final


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load `checkpoint`'s weights into `model` (plain, compiled or DDP-wrapped)."""
    missing, unexpected = safetensors.torch.load_model(unwrap(model), str(checkpoint / WEIGHTS), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{checkpoint / WEIGHTS}: does not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def load_state(checkpoint: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The training state saved with the weights (optimizer, step, loader, RNG).

    `weights_only=True` unpickles tensors and plain containers only: a state file carrying
    anything else (code to run, e.g. a planted `__reduce__`) is refused before it runs."""
    try:
        return torch.load(checkpoint / STATE, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{checkpoint / STATE}: refused: it holds objects other than tensors and plain values, "
            "and loading them could run code; delete this checkpoint"
        ) from None


def load_model(checkpoint: Path, device: torch.device | str = "cpu") -> GPT:
    """A GPT built from `checkpoint`'s config.json with its weights: e.g. the pretrained model to fine-tune."""
    checkpoint = Path(checkpoint)
    try:
        config = GPTConfig.model_validate(json.loads((checkpoint / CONFIG).read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"{checkpoint / CONFIG}: not a readable model config ({e})") from None
    model = GPT(config)
    load_weights(model, checkpoint)
    return model.to(device)
