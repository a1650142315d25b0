"""How training spreads the model over processes, applied from outside model/gpt.py (as torchtitan does).

    ddp     every rank holds the whole model; DistributedDataParallel all-reduces the
            gradients once per optimizer step.
    fsdp    FSDP2 (`fully_shard`) on every block, then on the root: parameters, gradients
            and AdamW moments are split over the ranks, and each block's weights are
            gathered only while it computes. For models whose training state does not fit on
            one device. The root's shard holds the embeddings and the output head, so the
            tied wte/lm_head weight stays one parameter.
    activation checkpointing    each block keeps only its input and recomputes its
            activations in the backward pass: less memory for about a third more compute,
            the same gradients.

With one process there is nothing to distribute: `parallel` has no effect, activation
checkpointing still applies.

Mixed precision. Under FSDP2, bf16 is a `MixedPrecisionPolicy`: parameters are cast to bf16
for forward and backward, gradients are reduced in fp32 and the fp32 weights updated.
Otherwise bf16 is autocast (model.train).

Gradient accumulation. Before a step's last micro-batch, gradients stay on their rank: DDP
skips its all-reduce, FSDP2 its reduce-scatter. Under FSDP2 that means every rank holds
full-size (unsharded) gradients until the step's last backward: less communication for more
memory. Where the full gradients do not fit one device, use one micro-batch per step.

State dicts, in the plain module's names (no `module.`, `_orig_mod.` or
`_checkpoint_wrapped_module.`) whatever the wrapping:

    full_state     weights and optimizer state gathered whole to rank 0's CPU: the
                   portable checkpoint, which resumes on any number of ranks in any mode.
    sharded_state  each rank's shards, for torch.distributed.checkpoint (DCP): for models
                   too large to gather (see model.checkpoint: trusted storage only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from model.config import RUN_ONLY
from model.gpt import GPT

Parallelism = Literal["ddp", "fsdp"]
# The step's optimizers (AdamW alone, or Muon and AdamW): torch.distributed.checkpoint keys the
# state of all of them by parameter name in one dict, and splits it back on load.
Optimizers = Sequence[torch.optim.Optimizer]
CheckpointFormat = Literal["safetensors", "dcp"]


class ParallelConfig(BaseModel):
    """How the run is spread over its processes and saved: none of it changes what is computed."""

    model_config = ConfigDict(extra="forbid")

    parallel: Parallelism = Field(
        "ddp",
        description="several processes: ddp replicates the model, fsdp (FSDP2) shards it",
        json_schema_extra=RUN_ONLY,
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward", json_schema_extra=RUN_ONLY
    )
    checkpoint_format: CheckpointFormat = Field(
        "safetensors",
        json_schema_extra=RUN_ONLY,
        description="safetensors: gathered to rank 0, resumes anywhere; dcp: sharded torch.distributed.checkpoint, "
        "for models too large to gather, trusted storage only (it unpickles its metadata)",
    )


def parallelize(
    model: GPT, config: ParallelConfig, device: torch.device, world_size: int, bf16: bool, compile: bool
) -> nn.Module:
    """Prepare `model` (changed in place) for `world_size` processes on `device`.

    Returns the module to call forward on: `model` itself, DDP around it, or torch.compile's
    wrapper around either. Build the optimizer afterwards, from `model.parameters()`:
    sharding replaces the parameters.
    """
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if world_size > 1 and config.parallel == "fsdp":
        shard(model, device, world_size, bf16, compile)  # moves each module's shard to the device as it goes
        return model
    model.to(device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    return torch.compile(net) if compile else net


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing per block (non-reentrant, with the RNG state replayed so dropout
    recomputes the same masks). The wrapper's state-dict hooks keep the parameter names."""
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block)


def shard(model: GPT, device: torch.device, world_size: int, bf16: bool, compile: bool) -> None:
    """FSDP2: each block is one unit of all-gather and reduce-scatter; the root takes what is left
    (embeddings, tied head, final LayerNorm), so the tie between wte and lm_head survives.
    torch.compile goes block by block, in place (parameter names unchanged), inside the
    sharding as torchtitan does."""
    mesh = init_device_mesh(device.type, (world_size,))
    # bf16 compute; gradients reduced and weights kept in fp32
    policy = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def local_gradients(net: nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients on this rank (accumulation micro-steps)."""
    net = getattr(net, "_orig_mod", net)  # under torch.compile's wrapper
    if isinstance(net, DDP):
        with net.no_sync():
            yield
    elif isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over all ranks' shards; returns it before clipping, a plain tensor.

    With FSDP2 the gradients are DTensors: clip_grad_norm_ reduces their norms over the
    shards and returns a replicated DTensor."""
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


_GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizers: Optimizers) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state), whole on rank 0's CPU; empty on the other ranks. Every rank must call it.

    The optimizer state is keyed by parameter name, not by position, so it loads into a
    model wrapped differently."""
    return get_model_state_dict(model, options=_GATHERED), get_optimizer_state_dict(
        model, optimizers, options=_GATHERED
    )


def load_full_state(
    model: nn.Module,
    optimizers: Optimizers,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load `full_state`'s output. Under torchrun only rank 0's arguments are read: it
    broadcasts them, and each rank keeps its shard (FSDP2) or a copy (DDP)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)


def sharded_state(model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    """This rank's shards of the weights and optimizer state (whole tensors when not sharded), for DCP."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizers)}


def load_sharded_state(model: nn.Module, optimizers: Optimizers, state: dict[str, Any]) -> None:
    """Load `sharded_state`'s output after DCP has filled it in place."""
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizers, state["optimizer"])
