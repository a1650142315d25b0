"""Prefect flows: the pipeline, its data subflow and the single-purpose flows, with what wraps
a flow run (`flows.run`), the pipeline's config and its steps, the plan and housekeeping.

Importing this package, or any module in it, leaves the environment alone: the entry points
apply gptflow's environment defaults themselves (see `ops.environment`).
"""
