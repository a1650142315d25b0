"""Checks against this machine when a run starts, before any stage runs.

A config loads and plans anywhere (`--dry-run` on a laptop for a GPU machine); only a run
needs the devices it names. Each problem is one `UserError` naming the field and what this
machine has: a device it lacks, bf16 on a GPU without it, more processes than GPUs, a
micro-batch that does not divide the step's tokens (found here rather than after the data
stages have run).
"""

from __future__ import annotations

from collections.abc import Collection

from flows.pipeline_config import PipelineConfig
from model.device import cuda_device_count, machine_devices, resolve_device, training_bf16
from model.errors import UserError
from model.train import TrainConfig, accumulation_steps


def check_training(
    config: TrainConfig, section: str, seq_len: int | None, nproc_per_node: int = 1, nnodes: int = 1
) -> None:
    """A training section's device, precision and batch shape (`seq_len` None: known only once
    the model loads, so the engine checks it then) on this machine."""
    device = resolve_device(config.device, f"{section}.device")
    if device.type == "cuda" and nproc_per_node > 1:
        if ":" in config.device:
            raise UserError(
                f"{section}.device: {config.device} names one device, but {section}.nproc_per_node is "
                f"{nproc_per_node}; use cuda (each process takes its local rank's device)"
            )
        if nproc_per_node > cuda_device_count():
            raise UserError(
                f"{section}.nproc_per_node: {nproc_per_node} processes, one per GPU, but {machine_devices()}"
            )
    training_bf16(device, config.bf16, f"{section}.bf16")
    if seq_len is not None:
        accumulation_steps(config, seq_len, nproc_per_node * nnodes, f"{section}.")


def check_run(
    config: PipelineConfig, training: Collection[str] = ("pretrain", "finetune"), finetune_from: str | None = None
) -> None:
    """The pipeline's `device`, and each training stage in `training` the run includes;
    `finetune_from` is the model fine-tuning starts from when not this run's pretraining."""
    resolve_device(config.device, "device")
    if "pretrain" in training:
        pretrain = config.pretrain
        check_training(pretrain, "pretrain", config.shard.seq_len, pretrain.nproc_per_node, pretrain.nnodes)
    if "finetune" in training and config.finetune is not None:
        # Fine-tuning rows are the base model's context long unless finetune.seq_len says
        # otherwise; a base from elsewhere (a registered model, model.init_from) has its own context.
        own_base = not (finetune_from or config.finetune.start_from or config.model.init_from)
        base_context = config.model.resolve(vocab_size=1).block_size if own_base else None
        check_training(config.finetune, "finetune", config.finetune.seq_len or base_context)
