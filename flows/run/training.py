"""The training stages as every flow runs them (pipeline, pretrain, finetune).

Each holds slots of the global concurrency limit `gpu` while it trains (one per training
process, flows/run/context.py), and Prefect retries it on the failures a retry can fix, the retry
resuming from the newest checkpoint (which failures: tasks/core/retry.py).
"""

from __future__ import annotations

from pathlib import Path

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State, get_state_exception

from flows.pipeline_config import PipelineConfig
from flows.prepare import PreparedData
from flows.run.context import holding_gpus
from tasks.core.retry import recoverable
from tasks.core.training_stage import TrainingStageConfig
from tasks.finetune import FinetuneOutput, finetune_task
from tasks.pretrain import PretrainOutput, pretrain_task


def may_recover(task: Task, run: TaskRun, state: State) -> bool:
    """`retry_condition_fn` of the training stages."""
    return recoverable(get_state_exception(state))


def retrying(stage_task: Task, config: TrainingStageConfig) -> Task:
    """`stage_task` with the retries its config asks for, on recoverable failures only."""
    return stage_task.with_options(
        retries=config.retries, retry_delay_seconds=config.retry_delay_seconds, retry_condition_fn=may_recover
    )


def pretrained(config: PipelineConfig, data: PreparedData, parent_run_id: str) -> PretrainOutput:
    """The pretrain stage on the prepared shards (skipped when its manifest exists)."""
    with holding_gpus(config.pretrain.nproc_per_node):
        return retrying(pretrain_task, config.pretrain)(
            config.pretrain, config.model, data.shards, config.workspace, parent_run_id=parent_run_id, return_state=True
        ).result()


def finetuned(config: PipelineConfig, base: str | Path, data: PreparedData, parent_run_id: str) -> FinetuneOutput:
    """The finetune stage from `base` (a checkpoint directory or a registered model), replaying
    the prepared shards (skipped when its manifest exists)."""
    assert config.finetune is not None  # the caller's check: a config without one does not fine-tune
    with holding_gpus():
        return retrying(finetune_task, config.finetune)(
            config.finetune,
            base,
            data.tokenizer.tokenizer,
            data.corpus.corpus,
            config.workspace,
            parent_run_id=parent_run_id,
            shards=data.shards.manifest,
            return_state=True,
        ).result()
