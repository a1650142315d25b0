"""Retries of the training stages: on failures a retry can fix, resuming from the newest checkpoint.

A training stage that loses a rank (a node or a process died, a loader worker was killed,
a CUDA or NCCL error) would resume exactly from its newest checkpoint when run again, so
Prefect retries it (`retries`, `retry_delay_seconds` in the stage's config) and the retry
resumes through `train_once`. A user error (a config field, a missing file) or a non-finite
loss (`NonFiniteLoss`, a UserError) would only fail again: those never retry.
"""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import task_run
from prefect.states import State, get_state_exception

from model.errors import UserError
from tasks import tracking
from tasks.core.training_stage import TrainingStageConfig

# What torch raises in a rank when its device, a peer or a loader worker fails; the message
# is all that tells a lost loader worker from other RuntimeErrors.
RECOVERABLE_MESSAGES = ("DataLoader worker", "CUDA error", "NCCL", "Connection reset by peer")


class RankFailure(Exception):
    """A training process died or its device or communication failed: a retry resumes from the newest checkpoint."""


def recoverable(error: BaseException) -> bool:
    """Whether a retry of a training stage that failed with `error` may succeed."""
    if isinstance(error, UserError):  # bad input, or a non-finite loss: it would happen again
        return False
    if isinstance(error, RankFailure):
        return True
    distributed = type(error).__module__.startswith("torch.distributed")  # DistBackendError, DistNetworkError
    return distributed or (isinstance(error, RuntimeError) and any(m in str(error) for m in RECOVERABLE_MESSAGES))


def may_recover(task: Task, run: TaskRun, state: State) -> bool:
    """`retry_condition_fn` of the training stages."""
    return recoverable(get_state_exception(state))


def retrying(stage_task: Task, config: TrainingStageConfig) -> Task:
    """`stage_task` with the retries its config asks for, on recoverable failures only."""
    return stage_task.with_options(
        retries=config.retries, retry_delay_seconds=config.retry_delay_seconds, retry_condition_fn=may_recover
    )


def log_attempt(run_id: str) -> None:
    """Mark a retry on the stage's MLflow run: which attempt this is (the failed ones' runs ended FAILED)."""
    attempt = task_run.run_count
    if attempt > 1:
        tracking.set_tags(run_id, {"gptflow.attempt": str(attempt), "gptflow.retry": f"retry {attempt - 1}, resuming"})
        tracking.log_metrics(run_id, {"attempt": attempt})
