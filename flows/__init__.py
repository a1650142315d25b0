"""Prefect flows and the `gptflow` command line.

Importing this package, or any module in it, leaves the environment alone: the entry points
apply gptflow's environment defaults themselves (see `flows.environment`).
"""
