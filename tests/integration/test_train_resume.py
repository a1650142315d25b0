"""An interrupted and resumed run is bitwise the run that was never interrupted.

Three fresh processes: one trains 8 steps; one is sent SIGTERM during step 4 and stops
after writing its checkpoint; one resumes from that checkpoint to step 8. With dropout on,
the RNG states matter too, and the interrupted run reads through DataLoader workers whose
prefetched batches must not be skipped.
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

from model.train import RunSpec
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import make_shards
from support.processes import run_python

TRAIN = """
import json, os, signal, sys
from pathlib import Path
from model.train import RunSpec, TrainingInterrupted, run

spec = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
stop_at = int(sys.argv[2])
losses = {}

def record(step, metrics):
    losses[step] = [metrics.get("loss"), metrics.get("val_loss")]  # step 0: the initial weights' val_loss only
    if stop_at and step == stop_at:  # 0: run to the end
        os.kill(os.getpid(), signal.SIGTERM)  # as Prefect cancels: the step in flight finishes

try:
    result = run(spec, record)
    status = f"finished at {result.steps}"
except TrainingInterrupted as e:
    status = f"interrupted at {e.step}"
print(json.dumps({"status": status, "losses": losses}))
"""


def train_in_process(tmp_path, name, shards, stop_at=0, workers=0, out=None):
    spec = RunSpec(
        model=MICRO_GPT.model_copy(update={"dropout": 0.1}),
        train=micro_train_config(max_steps=8, checkpoint_every=3, keep_checkpoints=2, eval_every=4),
        shards=shards,
        val_windows=8,
        out_dir=out or tmp_path / name,
        loader_workers=workers,
    )
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(spec.model_dump_json())
    return json.loads(run_python(TRAIN, str(spec_path), str(stop_at)).splitlines()[-1])


def test_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    shards = make_shards(tmp_path / "shards", {"train": 200, "val": 40})

    whole = train_in_process(tmp_path, "whole", shards)
    first = train_in_process(tmp_path, "first", shards, stop_at=3, workers=2, out=tmp_path / "resumed")
    second = train_in_process(tmp_path, "second", shards, out=tmp_path / "resumed")

    assert whole["status"] == "finished at 8"
    assert first["status"] == "interrupted at 4"
    assert second["status"] == "finished at 8"
    assert list(second["losses"]) == ["5", "6", "7", "8"]
    assert {**first["losses"], **second["losses"]} == whole["losses"]  # floats compared exactly

    expected = safetensors.torch.load_file(tmp_path / "whole/checkpoints/step-8/model.safetensors")
    actual = safetensors.torch.load_file(tmp_path / "resumed/checkpoints/step-8/model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
