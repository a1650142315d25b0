"""Training and evaluation progress: plain lines off a terminal, a Prefect progress artifact
inside a task run, rank 0's progress file read back."""

import asyncio

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from tasks.core.train_progress import (
    ProgressFileReader,
    StageProgress,
    phase_progress,
    training_progress,
    write_progress_file,
)


def test_plain_lines_every_ten_steps_on_validation_and_at_the_end():
    lines = []
    with training_progress("pretrain", 25, lines.append) as progress:  # pytest's output is not a terminal
        for step in range(1, 26):
            figures = {"loss": 10.0 / step, "tokens_per_s": 1000.0, **({"val_loss": 3.0} if step == 15 else {})}
            progress.update(step, figures)
    assert [line.split(":")[0] for line in lines] == [
        "pretrain step 10/25",
        "pretrain step 15/25",
        "pretrain step 20/25",
        "pretrain step 25/25",
    ]
    assert lines[0].startswith("pretrain step 10/25: loss 1 tokens_per_s 1000 (about ")
    assert "val_loss 3 " in lines[1] and lines[-1] == "pretrain step 25/25: loss 0.4 tokens_per_s 1000"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_a_phase_prints_as_it_starts_after_its_first_step_every_ten_seconds_and_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("tasks.core.train_progress.time", clock)
    lines = []
    with phase_progress("finetune", "parse rate, pretrained", 6, lines.append) as progress:
        for step in range(1, 7):
            clock.now += 4.0  # each batch takes 4 s
            progress.update(step)
    assert lines == [
        "finetune: parse rate, pretrained 0/6",
        "finetune: parse rate, pretrained 1/6 (about 20 s left)",  # this phase's time left: 5 more batches
        "finetune: parse rate, pretrained 4/6 (about 8 s left)",  # 12 s after the last line
        "finetune: parse rate, pretrained 6/6",
    ]


def test_track_counts_items_as_they_are_consumed():
    lines = []
    with StageProgress("evaluate-progress", "evaluate batch", 0, lines.append) as progress:
        assert list(progress.track(iter("abcdefghijkl"), total=12)) == list("abcdefghijkl")
    assert lines[0].startswith("evaluate batch 10/12 (about ") and lines[1] == "evaluate batch 12/12"


def test_progress_file_reader_hands_on_each_newer_step(tmp_path):
    seen = []
    reader = ProgressFileReader(tmp_path / "progress.json", lambda step, metrics: seen.append((step, dict(metrics))))
    reader.poll()  # nothing written yet
    write_progress_file(tmp_path / "progress.json", 3, {"loss": 2.5})
    reader.poll()
    reader.poll()  # the same step again: not handed on twice
    write_progress_file(tmp_path / "progress.json", 7, {"loss": 2.0})
    reader.poll()
    assert seen == [(3, {"loss": 2.5}), (7, {"loss": 2.0})]


def test_training_time_left_is_at_the_pace_of_its_steps_not_of_what_came_before(monkeypatch):
    """Fine-tuning enters its training progress before the held-out scoring (minutes): the time
    left after step 10 counts the training steps' pace only, as does a resumed run's."""
    clock = Clock()
    monkeypatch.setattr("tasks.core.train_progress.time", clock)
    lines = []
    with training_progress("finetune", 25, lines.append) as progress:
        clock.now += 100.0  # held-out scoring, before the first step
        for step in range(1, 11):
            clock.now += 2.0  # each step takes 2 s
            progress.update(step)
    assert lines == ["finetune step 10/25 (about 30 s left)"]  # 15 steps at 2 s, not 120 s / 10 * 15

    resumed = []
    with training_progress("pretrain", 100, resumed.append) as progress:
        for step in range(51, 61):  # resumed at step 50
            clock.now += 3.0
            progress.update(step)
    assert resumed == ["pretrain step 60/100 (about 120 s left)"]  # 40 steps at 3 s


def test_a_task_run_publishes_its_progress_as_a_prefect_artifact(prefect_server):
    @task
    def train_a_little() -> None:
        with training_progress("toy", 4, print) as progress:
            for step in range(1, 5):
                progress.update(step, {"loss": 1.0})

    @flow
    def toy_flow() -> None:
        train_a_little()

    toy_flow()

    async def artifacts():
        async with get_client() as client:
            only_toy = ArtifactFilter(key=ArtifactFilterKey(any_=["toy-progress"]))
            return await client.read_artifacts(artifact_filter=only_toy)

    [artifact] = asyncio.run(artifacts())
    assert artifact.type == "progress" and artifact.data == 100.0 and artifact.task_run_id is not None
