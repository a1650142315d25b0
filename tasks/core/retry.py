"""Which failures of a training stage a retry can fix: those that resume from the newest checkpoint.

A training stage that loses a rank (a node or a process died, a loader worker was killed,
a CUDA or NCCL error) would resume exactly from its newest checkpoint when run again, so
Prefect retries it (`retries`, `retry_delay_seconds` in the stage's config; the policy is
flows/run/training.py's) and the retry resumes through `train_once`. A user error (a config
field, a missing file) or a non-finite loss (`NonFiniteLoss`, a UserError) would only fail
again: those never retry. The retry's attempt number is marked on the stage's MLflow run by
`tasks.tracking.stage_run.log_attempt`.
"""

from __future__ import annotations

from model.errors import UserError

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
