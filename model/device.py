"""Where a model runs and at what precision: the `device` settings, resolved against this machine.

A `device` setting is one of

    auto      the first CUDA device when this machine has one, else the CPU
    cpu
    cuda      under torchrun, each process takes the device of its local rank
    cuda:N    one device (one process)

Its spelling is checked when the config loads (`DeviceName`); whether this machine has the
device only when a run starts (`resolve_device`), so a config for a GPU machine still loads
and plans anywhere. Problems are `UserError`s naming the field and what this machine has.

Inference (evaluation, generation) runs its matmuls in bf16 autocast on a GPU that has bf16
(`inference_autocast`); the model keeps its logits in fp32 (`GPT.forward(fp32_logits=True)`)
and the loss sums are fp32, so the figures stay comparable with a CPU evaluation.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated

import torch
from pydantic import AfterValidator

from model.errors import UserError

DEVICE_SPELLING = re.compile(r"auto|cpu|cuda(:\d+)?")
SPELLINGS = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> str:
    """A pydantic validator: `name` is spelt as a device setting."""
    if not DEVICE_SPELLING.fullmatch(name):
        raise ValueError(f"{name!r} is not a device; use {SPELLINGS}")
    return name


DeviceName = Annotated[str, AfterValidator(check_device_name)]


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine_devices() -> str:
    """What this machine has, for an error message: "this machine has 2 CUDA devices: cuda:0 (...), ..."."""
    count = cuda_device_count()
    if not count:
        return "this machine has no CUDA device (only the CPU)"
    names = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
    return f"this machine has {count} CUDA device{'s' if count > 1 else ''}: {names}"


def resolve_device(name: str, field: str = "device", local_rank: int = 0) -> torch.device:
    """The torch.device the setting `field` (spelt `name`) names on this machine."""
    try:
        check_device_name(name)
    except ValueError as e:
        raise UserError(f"{field}: {e}") from None
    if name == "auto":
        name = "cuda" if cuda_device_count() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        return device
    count = cuda_device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"{field}: {name} is not a device here; {machine_devices()}")
    if device.index is None and local_rank >= count:  # with no GPU, local rank 0 finds none either
        needs = "a CUDA device" if not count else f"cuda:{local_rank} for local rank {local_rank}"
        raise UserError(f"{field}: {name} needs {needs}; {machine_devices()}")
    return torch.device("cuda", local_rank if device.index is None else device.index)


def device_model(device: torch.device) -> str:
    """The accelerator's name as its driver reports it ("NVIDIA H100 80GB HBM3"), or "CPU"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def describe_device(name: str, field: str = "device") -> str:
    """What `--dry-run` prints for a setting: never fails, whatever this machine has."""
    try:
        device = resolve_device(name, field)
    except UserError:
        return f"{name} (not on this machine: {machine_devices()})"
    return f"{name} -> {device} ({device_model(device)})"


def has_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively (a CPU emulates them, a GPU before Ampere lacks them)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_bf16(device: torch.device, requested: bool | None, field: str = "bf16") -> bool:
    """Whether training autocasts to bf16: as `requested`, by default on a GPU that has bf16."""
    if requested is None:
        return has_bf16(device)
    if requested and device.type == "cuda" and not has_bf16(device):
        raise UserError(f"{field}: true, but {device} ({device_model(device)}) has no bf16; set {field}: false")
    return requested


def inference_autocast(device: torch.device) -> AbstractContextManager:
    """bf16 matmuls on a GPU that has them. Elsewhere nothing changes: an autocast the caller
    already entered (a test's CPU bf16 autocast) stays in force."""
    if has_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
