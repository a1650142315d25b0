"""The pretrain stage's torchrun entry point: `torchrun ... -m tasks.pretrain_worker spec.json`.

Every rank runs `model.train.main`; rank 0 also logs each step's metrics to the stage's
MLflow run, named by `RUN_ID_ENV` in the environment, so that `model/` stays free of
MLflow, and writes its latest step to `PROGRESS_FILE_ENV`'s file, which the task's process
shows as the stage's progress (the ranks need not reach Prefect).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from model.runtime import DistributedEnv
from model.train import main
from tasks.core.train_progress import write_progress_file
from tasks.pretrain import PROGRESS_FILE_ENV, RUN_ID_ENV
from tasks.tracking.step_metrics import step_metrics


def worker() -> None:
    run_id = os.environ.get(RUN_ID_ENV)
    if not (DistributedEnv.from_environ().is_main and run_id):
        main(callback=lambda step, metrics: None)
        return
    progress_file = os.environ.get(PROGRESS_FILE_ENV)
    listeners = [partial(write_progress_file, Path(progress_file))] if progress_file else []
    with step_metrics(run_id, *listeners) as on_step:
        main(callback=on_step)


if __name__ == "__main__":
    worker()
