"""The process a training loop runs in: its place in a torchrun launch, its device and
threads, its process group, its random streams, and the signals that ask it to stop.

Without torchrun the process is rank 0 of 1 and has no process group. Under torchrun every
rank calls the same functions; those that gather (`rng_states`) are collectives, so every
rank must call them together.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from model.device import resolve_device


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environ(cls) -> DistributedEnv:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)),
            int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def training_device(name: str, env: DistributedEnv) -> torch.device:
    """The device the setting `name` resolves to for this rank (see `model.device`); CUDA's
    current device is set to it."""
    device = resolve_device(name, local_rank=env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def configure_runtime(device: torch.device, env: DistributedEnv) -> None:
    """Threads and matmul precision: the settings that decide how fast a step runs."""
    if device.type == "cpu":
        # Processes on one machine share its cores; oversubscribing them halves throughput.
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // env.local_world_size))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextmanager
def process_group(env: DistributedEnv, device: torch.device) -> Iterator[None]:
    if env.world_size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rng_states(device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (dropout), gathered so rank 0 can save them all."""
    local = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)  # between our own processes, not from a file
    return gathered


def restore_rng(
    saved: list[dict[str, torch.Tensor]], env: DistributedEnv, seed: int, step: int, device: torch.device
) -> None:
    if len(saved) == env.world_size:
        torch.set_rng_state(saved[env.rank]["cpu"])
        if device.type == "cuda" and "cuda" in saved[env.rank]:
            torch.cuda.set_rng_state(saved[env.rank]["cuda"], device)
    else:  # resumed on a different number of ranks: fresh, still deterministic streams
        torch.manual_seed(seed + 1_000_003 * step + env.rank)


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop stops at the end of the current step."""

    signum: int | None = None


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Catch SIGINT/SIGTERM while training. Signals reach only the main thread; elsewhere
    (a worker thread) the process's own handlers stay in charge."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum: int, frame: object) -> None:
        stop.signum = signum

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
