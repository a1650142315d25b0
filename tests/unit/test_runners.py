"""The task runner a `task_runner:` section makes, and its worker count."""

from __future__ import annotations

import os

from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows.runners import TaskRunnerConfig, make_task_runner


def test_threads_and_processes_default_to_one_worker_per_cpu():
    threads = make_task_runner(TaskRunnerConfig())
    processes = make_task_runner(TaskRunnerConfig(kind="processes"))
    assert isinstance(threads, ThreadPoolTaskRunner) and isinstance(processes, ProcessPoolTaskRunner)
    assert threads._max_workers == processes._max_workers == os.cpu_count()  # no public accessor
    assert make_task_runner(TaskRunnerConfig(kind="processes", n_workers=3))._max_workers == 3
