"""Where evaluation and fine-tuning take a model from: a checkpoint directory or the registry.

A model is named by a path (a checkpoint `step-N/` directory, a `checkpoints/` directory or
a stage directory that holds one: the newest checkpoint is taken) or by an MLflow model
URI, `models:/NAME@ALIAS` or `models:/NAME/VERSION`. Either way the caller gets the GPT
and a digest that identifies its weights (for stage fingerprints); a registered model's
own tokenizer is checked against the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import WEIGHTS, latest_checkpoint, load_model
from model.errors import UserError
from model.gpt import GPT
from tasks.core.workspace import sha256_file
from tasks.tracking.registry import load_registered_model

REGISTRY_SCHEME = "models:/"


@dataclass
class LoadedModel:
    model: GPT
    digest: str  # sha256 of the weights file


def is_registry_uri(spec: str | Path) -> bool:
    return str(spec).startswith(REGISTRY_SCHEME)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` names: itself, or the newest one under it."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for checkpoints in (path, path / "checkpoints"):
        if found := latest_checkpoint(checkpoints):
            return found
    raise UserError(f"{path}: not a checkpoint directory (no {WEIGHTS}, no checkpoints/step-N under it)")


def load_model_source(spec: str | Path, tokenizer: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load the model `spec` names (see the module docstring) to use with `tokenizer`.

    A registered model brings its own tokenizer; it must be the same file, since the
    pipeline's shards and pairs are encoded with `tokenizer`.
    """
    if is_registry_uri(spec):
        model, weights, own_tokenizer = load_registered_model(str(spec))
        if sha256_file(own_tokenizer) != sha256_file(tokenizer):
            raise UserError(
                f"{spec}: the model was trained with a different tokenizer than {tokenizer}; "
                "use it with the config (data) it was trained on"
            )
        return LoadedModel(model.to(device), sha256_file(weights))
    checkpoint = find_checkpoint(Path(spec))
    return LoadedModel(load_model(checkpoint, device), sha256_file(checkpoint / WEIGHTS))
