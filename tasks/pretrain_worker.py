"""The pretrain stage's torchrun entry point: `torchrun ... -m tasks.pretrain_worker spec.json`.

Every rank runs `model.train.main`; rank 0 also logs each step's metrics to the stage's
MLflow run, named by `RUN_ID_ENV` in the environment, so that `model/` stays free of
MLflow. Progress lines go to stdout every `PRINT_EVERY` steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from model.runtime import DistributedEnv
from model.train import main, print_metrics
from tasks import tracking
from tasks.pretrain import RUN_ID_ENV

PRINT_EVERY = 10


def worker() -> None:
    run_id = os.environ.get(RUN_ID_ENV)
    if not (DistributedEnv.from_environ().is_main and run_id):
        main(callback=lambda step, metrics: None)
        return
    with tracking.MetricsLogger(run_id) as log_metrics:

        def on_step(step: int, metrics: Mapping[str, float]) -> None:
            log_metrics(step, metrics)
            if step % PRINT_EVERY == 0 or "val_loss" in metrics:
                print_metrics(step, metrics)

        main(callback=on_step)


if __name__ == "__main__":
    worker()
