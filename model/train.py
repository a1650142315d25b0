"""The training engine: one loop for pretraining and fine-tuning, on one device or under torchrun.

    python -m model.train spec.json                          # one process
    torchrun --nproc_per_node 2 -m model.train spec.json     # DDP (or FSDP2), one process per device
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        --rdzv_id RUN -m model.train spec.json               # the same on every node (docs/multinode.md)

`spec.json` is a `RunSpec`: the model, the `TrainConfig`, the shard manifest, the output
directory. Programs call `train(model, config, train_data, val_data, out_dir, callback)`.

Data interface. The engine reads any object that behaves like `Batches`:

    iter(data)              yields (inputs, targets): CPU LongTensors of shape
                            (batch_size, seq_len); a target of -100 is not scored (fine-tuning
                            masks its prompts that way). Training draws from one iterator for
                            the whole run, so it must not end (roll over into the next epoch).
                            Every `iter()` starts from the loaded state, or the beginning.
    data.state_dict()       the position after the last batch yielded, as plain values;
    data.load_state_dict(s) continue from there: the next batch is the one that would have
                            followed. This is what makes a resumed run exact.
    data.batch_size, data.seq_len

Each process builds its own `Batches` for its rank (`DistributedEnv.from_environ()`), with
`batch_size = config.micro_batch_size`; `model.data.WindowLoader` is the shard loader.

How the model is spread over the processes (DDP or FSDP2, activation checkpointing) and how
checkpoints are written (gathered safetensors or sharded DCP) are `model.parallel`'s
switches, part of the TrainConfig; `model.checkpoint` writes and reads them back, and
`model.runtime` holds the process around the loop: its rank, device, process group, random
streams and stop signals. Checkpoints hold the whole model's state in the plain module's
names, so a run resumes on any number of processes, in either mode.

One optimizer step: `batch_tokens` tokens across `accumulation_steps` micro-batches and all
ranks. The loss is the summed cross-entropy over every scored target of the step divided by
their number, so a micro-batch with more masked targets weighs less, exactly as in one big
batch. Gradients are reduced over the ranks only on the last micro-step. A step whose loss or gradient
norm is not finite stops the run without changing the weights (`NonFiniteLoss`); the newest
checkpoint stays the last good one.

The host waits for the device once a step, after the whole step (the optimizers' update
included) is queued and the next step's batches are drawn and on their way from pinned memory:
the finite check is made on the device (`NonFiniteGuard`), and the host reads the loss, the
gradient norm and the ranks' stop flags together afterwards (`read_outcome`).
SIGINT/SIGTERM finish the current step, write a checkpoint and raise `TrainingInterrupted`.

Metrics go to `callback(step, metrics)` on rank 0 after every step: loss, lr, grad_norm,
tokens_per_s, mfu (when `model.mfu` knows the device's peak), memory_mb, and val_loss every
`eval_every` steps and at the end; with `eval_at_start`, first the initial weights' val_loss at
step 0. Validation scores every batch of `val_data` (a finite collection, the same at each
validation): `run` gives it the `val_windows` evenly spaced windows of the val split
(`model.scoring.val_windows`) that the evaluate stage scores too.
Rank 0 prints where it trains, in what precision and the peak its MFU is against (`Runtime`,
also in the TrainResult).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import signal
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch import nn

from model.checkpoint import latest_checkpoint, load_training_checkpoint, load_weights, save_training_checkpoint
from model.config import RUN_ONLY, GPTConfig
from model.data import WindowLoader
from model.device import DeviceName, device_model, training_bf16
from model.errors import UserError
from model.gpt import GPT
from model.mfu import peak_flops
from model.muon import Muon
from model.parallel import ParallelConfig, clip_grad_norm, is_sharded, local_gradients, parallelize
from model.runtime import (
    DistributedEnv,
    StopRequest,
    configure_runtime,
    process_group,
    restore_rng,
    rng_states,
    stop_signals,
    training_device,
)
from model.schedule import Schedule, learning_rate
from model.scoring import IGNORE, VAL_WINDOWS, val_windows, window_batches

Callback = Callable[[int, Mapping[str, float]], None]

# Seconds, for checkpoint_minutes; a module attribute so that a test can make steps look slow.
clock = time.monotonic


class Batches(Protocol):
    batch_size: int
    seq_len: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), each (batch_size, seq_len)

# Validation batches: (inputs, targets) as in `Batches`, a finite collection scored whole each time.
ValBatches = Collection[tuple[torch.Tensor, torch.Tensor]]


class TrainConfig(ParallelConfig):
    """How to train: optimisation, batch, schedule, evaluation and checkpoint cadence, device,
    and (inherited) how the model is spread over processes."""

    max_steps: PositiveInt = Field(250, description="optimizer steps of the run")
    batch_tokens: PositiveInt = Field(4096, description="tokens per optimizer step, over all micro-batches and ranks")
    micro_batch_size: PositiveInt = Field(8, description="windows per forward pass on each rank")
    lr: PositiveFloat = Field(1e-3, description="the peak learning rate, reached after warmup_steps")
    min_lr: float = Field(1e-4, ge=0, description="the rate at the last step")
    warmup_steps: NonNegativeInt = Field(25, description="steps of linear warmup from 0 to lr")
    schedule: Schedule = Field(
        "cosine", description="after warmup: cosine down to min_lr, or wsd (hold lr, then decay linearly)"
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: torch.optim.Muon for the blocks' 2-D matrices, AdamW for the rest"
    )
    weight_decay: float = Field(0.1, ge=0, description="on weight matrices and embeddings only")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW's second-moment decay")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    eval_every: NonNegativeInt = Field(50, description="steps between validation losses; 0: only at the end")
    # On by default: the curve then starts from the initial weights' loss (about ln(vocab_size)),
    # which shows how far training got; it costs one validation more (about 16 s on tiny.yaml's
    # 2-core scale, where the run validates twice already). Weights do not depend on it: run-only.
    eval_at_start: bool = Field(
        True, description="also validate the initial weights, at step 0 (not on a resume)", json_schema_extra=RUN_ONLY
    )
    checkpoint_every: NonNegativeInt = Field(
        50, description="steps between checkpoints; 0: only at the end", json_schema_extra=RUN_ONLY
    )
    checkpoint_minutes: float = Field(
        30,
        ge=0,
        description="also checkpoint once this many minutes passed since the last one; 0: by steps only",
        json_schema_extra=RUN_ONLY,
    )
    keep_checkpoints: PositiveInt = Field(3, description="the newest checkpoints kept", json_schema_extra=RUN_ONLY)
    seed: int = Field(0, description="seeds the weights' initialisation, the order of the batches and dropout")
    resume: bool = Field(
        True, description="continue from the newest checkpoint in the output directory", json_schema_extra=RUN_ONLY
    )
    device: DeviceName = Field(
        "auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...", json_schema_extra=RUN_ONLY
    )
    bf16: bool | None = Field(
        None,
        description="bf16 autocast (fsdp: bf16 parameters in compute, fp32 reduction); default: on for a GPU with bf16",
    )
    compile: bool | None = Field(None, description="torch.compile the model; default: on for CUDA")

    @model_validator(mode="after")
    def _muon_needs_whole_matrices(self) -> TrainConfig:
        # Muon orthogonalizes each matrix's update as a whole; FSDP2 hands it one shard per rank.
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optimizer muon needs whole matrices on every rank: use parallel: ddp, not fsdp")
        return self


class Runtime(BaseModel):
    """Where and how a run computes, and what its MFU is measured against."""

    device: str  # e.g. "cuda:0"
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3", or "CPU"
    precision: str  # "bf16" or "fp32" (TF32 matmuls on a GPU)
    peak_flops: float | None  # None: no MFU (an accelerator without a datasheet figure)
    peak_source: str  # where the peak comes from, or why there is none

    def describe(self) -> str:
        peak = f"{self.peak_flops / 1e12:.4g} TFLOP/s ({self.peak_source})" if self.peak_flops else self.peak_source
        return f"device {self.device} ({self.device_name}), {self.precision}, MFU peak {peak}"


class TrainResult(BaseModel):
    steps: int
    checkpoint: Path
    train_loss: float  # of the last step
    val_loss: float | None  # of the last validation
    tokens: int  # trained on in this call (not before a resume), all ranks together
    seconds: float
    runtime: Runtime


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN or infinite; the weights were not updated."""


class TrainingInterrupted(BaseException):
    """SIGINT/SIGTERM stopped training after a checkpoint was written.

    A BaseException, like KeyboardInterrupt: `except Exception` handlers must not swallow
    a stop request."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name}: stopped after step {step}; checkpoint {checkpoint} (run again to resume)")


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """A 2-D weight inside a transformer block (attention and MLP projections): what Muon updates.
    The embeddings (token, tied head, positions) are lookups, not maps between hidden states."""
    return param.dim() == 2 and ".h." in f".{name}"


def configure_optimizers(model: nn.Module, config: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The step's optimizers, each parameter in exactly one.

    adamw: AdamW with weight decay on matrices (linear weights, embeddings) only. Biases and
    LayerNorm gains are vectors: decaying them towards zero only hurts (as in GPT-3 and
    nanoGPT). The tied head/embedding is one Parameter and is listed once.

    muon: Muon (torch.optim.Muon, orthogonalizing in float32 off CUDA: `model.muon`) for the
    blocks' 2-D matrices, as in the fastest GPT-2 speedruns,
    with its update scaled to AdamW's size (Moonshot's "match_rms_adamw", "Muon is Scalable
    for LLM Training") so that one `lr` and `weight_decay` serve both; AdamW as above for the
    embeddings, biases and gains.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    hidden = [p for name, p in named if config.optimizer == "muon" and is_hidden_matrix(name, p)]
    rest = [p for name, p in named if not (config.optimizer == "muon" and is_hidden_matrix(name, p))]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type in ("cuda", "cpu")
    )
    if not hidden:
        return [adamw]
    muon = Muon(hidden, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    return [muon, adamw]


def accumulation_steps(config: TrainConfig, seq_len: int, world_size: int, section: str = "") -> int:
    """Micro-batches per optimizer step; `section` ("pretrain.") prefixes the fields an error names."""
    per_micro_step = config.micro_batch_size * seq_len * world_size
    if config.batch_tokens % per_micro_step:
        raise UserError(
            f"{section}batch_tokens ({config.batch_tokens}) must be a multiple of {section}micro_batch_size x "
            f"seq_len x processes = {config.micro_batch_size} x {seq_len} x {world_size} = {per_micro_step}"
        )
    return config.batch_tokens // per_micro_step


def summed_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the scored targets (not averaged: the step divides once), in fp32
    even when the model computes in bf16. Inside the model's forward, so that it is compiled with
    it and the full logits never exist (GPTConfig.loss_chunk)."""
    return model(inputs, targets, reduction="sum").loss


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Any = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over one step's micro-batches; returns (summed loss, scored targets),
    both summed over all ranks. The gradients are those of the mean loss over all of them.
    Under torchrun `model` is the DDP or FSDP2 module, which reduces the gradients on the last
    micro-batch only."""
    distributed = dist.is_initialized()
    micro_batches = [(inputs.to(device), targets.to(device)) for inputs, targets in micro_batches]  # no-op if there
    # Counted on the device: a count on the host would have to be copied over, a host sync.
    scored = sum((targets != IGNORE).sum(dtype=torch.float32) for _, targets in micro_batches)
    if distributed:
        dist.all_reduce(scored)
    # DDP and FSDP2 average gradients over ranks; scaling by the world size turns that into the sum.
    scale = (dist.get_world_size() if distributed else 1) / scored.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else local_gradients(model):
            with autocast():
                loss = summed_loss(model, inputs, targets)
            (loss * scale).backward()
        loss_sum += loss.detach().float()
    if distributed:
        dist.all_reduce(loss_sum)
    return loss_sum, scored


@torch.no_grad()
def validation_loss(model: nn.Module, batches: ValBatches, device: torch.device, autocast: Any) -> float:
    """Mean loss per scored target over every rank's validation batches."""
    model.eval()
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            totals[0] += summed_loss(model, inputs, targets).double()
        totals[1] += (targets != IGNORE).sum()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    nats, scored = totals.tolist()
    return nats / scored if scored else math.nan


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device` without stopping the host: on a GPU the copy starts from pinned memory
    and runs behind the work already queued (PyTorch keeps the pinned buffer until it is done)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class NonFiniteGuard:
    """Runs an optimizer's step so that it leaves the weights as they were when the step's loss or
    gradient norm is not finite, decided on the device: the host reads that flag only after the
    step's kernels are queued.

    A fused AdamW skips its update itself when its `found_inf` attribute is 1 (what GradScaler
    sets; the kernel reads it on the device). Other optimizers (torch.optim.Muon, which has no
    such hook, or an unfused AdamW) step anyway and the guard puts the weights back where the
    flag is set: a copy of their parameters before the step, and a select after it. That costs
    one copy of those parameters' memory (Muon: the blocks' matrices) and two passes over them
    per step, without a host sync."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.fused = bool(optimizer.defaults.get("fused"))
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.saved = [] if self.fused else [torch.empty_like(p, requires_grad=False) for p in self.params]

    @torch.no_grad()
    def step(self, nonfinite: torch.Tensor) -> None:
        """`nonfinite`: a float32 scalar on the parameters' device, 1.0 to keep the weights."""
        if self.fused:
            self.optimizer.found_inf = nonfinite
            self.optimizer.step()
            return
        for saved, param in zip(self.saved, self.params):
            saved.copy_(param)
        self.optimizer.step()
        keep = nonfinite.bool()
        for saved, param in zip(self.saved, self.params):
            torch.where(keep, saved, param, out=param)


class TrainingRun:
    """What one call of `train` holds between setup and the end of its loop: the model (plain and
    parallelized), its optimizers, the data, and how and where it computes and checkpoints."""

    def __init__(
        self,
        model: GPT,
        config: TrainConfig,
        train_data: Batches,
        out_dir: Path,
        env: DistributedEnv,
        device: torch.device,
    ):
        self.model, self.config, self.train_data, self.env, self.device = model, config, train_data, env, device
        self.checkpoints = Path(out_dir) / "checkpoints"
        use_bf16 = training_bf16(device, config.bf16)
        use_compile = device.type == "cuda" if config.compile is None else config.compile
        self.net = parallelize(model, config, device, env.world_size, use_bf16, use_compile)
        if model.config.has_sparse_layers:
            model.band_mask(train_data.seq_len, device)  # built now, outside the compiled graph
        self.optimizers = configure_optimizers(model, config, device)
        self.guards = [NonFiniteGuard(optimizer) for optimizer in self.optimizers]
        # FSDP2 casts the parameters itself (model.parallel); autocast is for the other modes.
        self.use_autocast = use_bf16 and not is_sharded(model)
        self.accumulation = accumulation_steps(config, train_data.seq_len, env.world_size)
        self.flops_per_token = model.config.flops_per_token(train_data.seq_len)
        peak = peak_flops(device, use_bf16)
        self.runtime = Runtime(
            device=str(device),
            device_name=device_model(device),
            precision="bf16" if use_bf16 else "fp32",
            peak_flops=peak.flops,
            peak_source=peak.source,
        )

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast)

    def resume(self) -> tuple[int, float]:
        """Load the newest checkpoint (if `config.resume` finds one): (its step, its train loss);
        otherwise seed the run: (0, nan)."""
        checkpoint = latest_checkpoint(self.checkpoints) if self.config.resume else None
        if checkpoint is None:
            torch.manual_seed(self.config.seed + self.env.rank)  # dropout masks differ across ranks
            return 0, math.nan
        state = load_training_checkpoint(
            checkpoint, self.model, self.optimizers, self.config.checkpoint_format, self.env.is_main
        )
        self.train_data.load_state_dict(state["data"])
        restore_rng(state["rng"], self.env, self.config.seed, state["step"], self.device)
        # What a run resumed at max_steps (killed before its caller recorded the result) returns.
        return state["step"], state.get("train_loss", math.nan)

    def next_micro_batches(self, batches: Iterator[MicroBatch]) -> list[MicroBatch]:
        """One step's micro-batches, their copies to the device queued behind the work in flight."""
        micro_batches = (next(batches) for _ in range(self.accumulation))
        return [(to_device(inputs, self.device), to_device(targets, self.device)) for inputs, targets in micro_batches]

    def set_learning_rate(self, step: int) -> float:
        config = self.config
        lr = learning_rate(
            step,
            lr=config.lr,
            min_lr=config.min_lr,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            schedule=config.schedule,
            decay_fraction=config.decay_fraction,
        )
        for group in (group for optimizer in self.optimizers for group in optimizer.param_groups):
            group["lr"] = lr
        return lr

    def agreed_flags(self, stopping: bool, minutes_up: bool) -> torch.Tensor:
        """(stop, checkpoint now) on the device; under torchrun every rank must agree to stop (or
        checkpoint) at the same step, so they are summed over the ranks."""
        flags = to_device(torch.tensor([stopping, minutes_up], dtype=torch.float32), self.device)
        if dist.is_initialized():
            dist.all_reduce(flags)
        return flags

    def save(self, step: int, train_loss: float, data_state: dict[str, Any]) -> Path:
        state = {
            "data": data_state,
            "rng": rng_states(self.device),
            "world_size": self.env.world_size,
            "train_loss": train_loss,
        }
        config = self.config
        return save_training_checkpoint(
            self.checkpoints,
            step,
            self.model,
            self.optimizers,
            state,
            config.checkpoint_format,
            config.keep_checkpoints,
            self.env.is_main,
        )


class StepOutcome(NamedTuple):
    """What the host learns from a step, in its one sync."""

    loss: float
    grad_norm: float
    stopping: bool
    time_to_save: bool


def queue_step(run: TrainingRun, micro_batches: list[MicroBatch], stopping: bool, minutes_up: bool) -> torch.Tensor:
    """Forward, backward, clipping and the optimizers' update of one step, queued on the device
    without a host sync. Returns (loss, gradient norm, stop, checkpoint now) on the device. A loss
    or gradient norm that is not finite leaves the weights unchanged (`NonFiniteGuard`)."""
    loss_sum, scored = accumulate_gradients(run.net, micro_batches, run.device, run.autocast)
    loss = loss_sum / scored.clamp(min=1)
    grad_norm = clip_grad_norm(run.model, run.config.grad_clip or math.inf)
    nonfinite = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    for guard in run.guards:
        guard.step(nonfinite)
        guard.optimizer.zero_grad(set_to_none=True)
    return torch.cat([torch.stack([loss, grad_norm.float()]), run.agreed_flags(stopping, minutes_up)])


def read_outcome(run: TrainingRun, step: int, report: torch.Tensor) -> StepOutcome:
    """The step's one host sync: wait for `queue_step`'s report, and stop on a non-finite loss
    (whose step changed no weight) with the last good checkpoint."""
    loss, grad_norm, stopping, time_to_save = report.tolist()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLoss(
            f"step {step + 1}: the training loss is {loss} (gradient norm {grad_norm}); stopped before "
            f"updating the weights. Last good checkpoint: {latest_checkpoint(run.checkpoints) or 'none written yet'}. "
            "Lower lr or raise warmup_steps, then resume from it."
        )
    return StepOutcome(loss, grad_norm, stopping > 0, time_to_save > 0)


def train(
    model: GPT,
    config: TrainConfig,
    train_data: Batches,
    val_data: ValBatches | None,
    out_dir: Path,
    callback: Callback | None = None,
) -> TrainResult:
    """Train `model` to `config.max_steps`, resuming from `out_dir/checkpoints` if `config.resume`.

    Checkpoints go to `out_dir/checkpoints/step-N/` (see model.checkpoint); rank 0 writes
    them (every rank its shards, with checkpoint_format dcp) and calls `callback`. Returns
    after the final checkpoint. `model` is changed in place by `model.parallel.parallelize`.
    """
    env = DistributedEnv.from_environ()
    device = training_device(config.device, env)
    configure_runtime(device, env)
    with process_group(env, device), stop_signals() as stop:
        run = TrainingRun(model, config, train_data, out_dir, env, device)
        step, train_loss = run.resume()
        if env.is_main:
            print(f"train: {run.runtime.describe()}", file=sys.stderr, flush=True)
        return training_loop(run, step, train_loss, val_data, stop, callback)


def training_loop(
    run: TrainingRun,
    step: int,
    train_loss: float,
    val_data: ValBatches | None,
    stop: StopRequest,
    callback: Callback | None,
) -> TrainResult:
    """Steps from `step` to `config.max_steps`: metrics, validation, checkpoints, stop requests."""
    config, device = run.config, run.device
    batches = iter(run.train_data)
    micro_batches = run.next_micro_batches(batches) if step < config.max_steps else []
    start_step, started, last_saved = step, time.perf_counter(), clock()
    val_loss = math.nan
    checkpoint = latest_checkpoint(run.checkpoints) if config.resume else None  # resumed at max_steps
    if val_data is not None and config.eval_at_start and step == 0:  # the curve's start: the initial weights
        initial = {"val_loss": validation_loss(run.model, val_data, device, run.autocast)}
        if callback is not None and run.env.is_main:
            callback(0, initial)
    while step < config.max_steps:
        step_started = time.perf_counter()
        lr = run.set_learning_rate(step)
        minutes_up = bool(config.checkpoint_minutes) and clock() - last_saved >= 60 * config.checkpoint_minutes
        report = queue_step(run, micro_batches, stop.signum is not None, minutes_up)
        data_state = run.train_data.state_dict()  # after this step's batches: what a checkpoint resumes from
        if step + 1 < config.max_steps:  # drawn and copied while the device runs this step
            micro_batches = run.next_micro_batches(batches)
        outcome = read_outcome(run, step, report)
        step, train_loss = step + 1, outcome.loss

        tokens_per_s = config.batch_tokens / (time.perf_counter() - step_started)
        metrics = {
            "loss": train_loss,
            "lr": lr,
            "grad_norm": outcome.grad_norm,
            "tokens_per_s": tokens_per_s,
            "memory_mb": peak_memory_mb(device),
        }
        if run.runtime.peak_flops:  # none for an accelerator without a datasheet figure (runtime.peak_source says why)
            metrics["mfu"] = run.flops_per_token * tokens_per_s / run.env.world_size / run.runtime.peak_flops
        final = step == config.max_steps
        if val_data is not None and (final or (config.eval_every and step % config.eval_every == 0)):
            val_loss = metrics["val_loss"] = validation_loss(run.model, val_data, device, run.autocast)
        every = config.checkpoint_every and step % config.checkpoint_every == 0
        if final or outcome.stopping or outcome.time_to_save or every:
            checkpoint, last_saved = run.save(step, train_loss, data_state), clock()
        if callback is not None and run.env.is_main:
            callback(step, metrics)
        if outcome.stopping and not final:
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, checkpoint)

    if val_data is not None and not math.isfinite(val_loss):  # resumed at max_steps: nothing ran
        val_loss = validation_loss(run.model, val_data, device, run.autocast)
    return TrainResult(
        steps=step,
        checkpoint=checkpoint,
        train_loss=train_loss,
        val_loss=val_loss if math.isfinite(val_loss) else None,
        tokens=(step - start_step) * config.batch_tokens,
        seconds=time.perf_counter() - started,
        runtime=run.runtime,
    )


class RunSpec(BaseModel):
    """Everything `python -m model.train` needs: what to build, how to train, on what, where."""

    model_config = ConfigDict(extra="forbid")

    model: GPTConfig
    train: TrainConfig
    shards: Path = Field(description="the shard stage's manifest.json")
    out_dir: Path
    val_windows: PositiveInt | None = Field(
        VAL_WINDOWS, description="val windows scored at each validation, evenly spaced over the split; null: all"
    )
    loader_workers: NonNegativeInt = 0
    init_from: Path | None = Field(None, description="a checkpoint whose weights training starts from (not resumes)")


def run(spec: RunSpec, callback: Callback | None = None) -> TrainResult:
    """Build the model (seeded) and this rank's loaders from `spec`, then train."""
    env = DistributedEnv.from_environ()

    train_data = WindowLoader(
        spec.shards,
        "train",
        spec.train.micro_batch_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=spec.train.seed,
        workers=spec.loader_workers,
    )
    windows = val_windows(spec.shards, spec.val_windows)
    val_data = list(window_batches(windows, spec.train.micro_batch_size, env.rank, env.world_size))
    if train_data.seq_len > spec.model.block_size or train_data.vocab_size > spec.model.vocab_size:
        raise UserError(
            f"{spec.shards}: windows of {train_data.seq_len} tokens with ids below {train_data.vocab_size} "
            f"do not fit the model (block_size {spec.model.block_size}, vocab_size {spec.model.vocab_size})"
        )
    torch.manual_seed(spec.train.seed)
    model = GPT(spec.model)
    if spec.init_from is not None:  # a resumed run then loads its own checkpoint over these weights
        load_weights(model, spec.init_from)
    return train(model, spec.train, train_data, val_data, spec.out_dir, callback)


def print_metrics(step: int, metrics: Mapping[str, float]) -> None:
    print(f"step {step}: " + " ".join(f"{key} {value:.4g}" for key, value in metrics.items()), flush=True)


def main(argv: list[str] | None = None, callback: Callback | None = None) -> None:
    """Command line entry (also under torchrun); `callback` defaults to printing each step."""
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a RunSpec as JSON: {model, train, shards, out_dir, loader_workers}")
    parser.add_argument(
        "--result", type=Path, help="the first process of this node writes the TrainResult (or the error) here as JSON"
    )
    args = parser.parse_args(argv)
    env = DistributedEnv.from_environ()
    is_main = env.is_main

    def report(outcome: dict[str, Any]) -> None:
        # Every rank ends with the same result; one per node writes it, so that each node's
        # launcher can read it even when global rank 0 runs on another node.
        if args.result and env.local_rank == 0:
            args.result.write_text(json.dumps(outcome))

    try:
        spec = RunSpec.model_validate_json(args.spec.read_text())
        result = run(spec, callback or print_metrics)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        report({"interrupted": str(e)})
        raise SystemExit(128 + e.signum) from None
    except (UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        report({"error": str(e)})
        raise SystemExit(2) from None
    report(result.model_dump(mode="json"))
    if is_main:
        print(f"done: {result.steps} steps, val_loss {result.val_loss}, checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
