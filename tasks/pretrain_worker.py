"""The pretrain stage's torchrun entry point: `torchrun ... -m tasks.pretrain_worker spec.json`.

Every rank runs `model.train.main`; rank 0 also logs each step's metrics to the stage's
MLflow run, named by `RUN_ID_ENV` in the environment, so that `model/` stays free of
MLflow, and writes its latest step to `PROGRESS_FILE_ENV`'s file, which the task's process
shows as the stage's progress (the ranks need not reach Prefect).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from model.runtime import DistributedEnv
from model.train import main
from tasks import tracking
from tasks.core.train_progress import write_progress_file
from tasks.pretrain import PROGRESS_FILE_ENV, RUN_ID_ENV


def worker() -> None:
    run_id = os.environ.get(RUN_ID_ENV)
    if not (DistributedEnv.from_environ().is_main and run_id):
        main(callback=lambda step, metrics: None)
        return
    progress_file = os.environ.get(PROGRESS_FILE_ENV)
    with tracking.MetricsLogger(run_id) as log_metrics:

        def on_step(step: int, metrics: Mapping[str, float]) -> None:
            log_metrics(step, metrics)
            if progress_file:
                write_progress_file(Path(progress_file), step, metrics)

        main(callback=on_step)


if __name__ == "__main__":
    worker()
