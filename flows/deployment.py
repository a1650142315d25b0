"""prefect.yaml's entry point: the pipeline flow, in a process that gptflow did not start.

A Prefect worker runs each flow run of the deployment in a fresh process that loads this file
by its path. No `gptflow` command ran before it, so the environment defaults are applied here,
before the pipeline's imports load MLflow (which reads its telemetry switch at import).
"""

from ops.environment import apply_defaults

apply_defaults()

from flows.pipeline import pipeline  # noqa: E402  (after the defaults, on purpose)

__all__ = ["pipeline"]
