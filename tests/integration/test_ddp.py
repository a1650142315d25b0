"""DDP under `torchrun --nproc_per_node 2` (gloo, CPU) against one process with the same
global batch; a communication hook counts the gradient all-reduces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from model.train import RunSpec
from support import REPO
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import make_shards

WORKER = """
import json, os, sys
from pathlib import Path

from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import model.parallel as parallel
from model.train import RunSpec, run

all_reduces = []


class CountingDDP(parallel.DDP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, counting_hook)


parallel.DDP = CountingDDP
losses = {}
spec = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
run(spec, lambda step, m: step and losses.update({step: m["loss"]}))  # step 0: the initial weights' val_loss only
if os.environ.get("RANK", "0") == "0":  # the process group is gone once run() returns
    print(json.dumps({"losses": losses, "all_reduces": len(all_reduces)}))
"""


def launch(tmp_path, name, shards, nproc, optimizer):
    spec = RunSpec(
        model=MICRO_GPT,
        train=micro_train_config(max_steps=3, batch_tokens=256, checkpoint_every=0, optimizer=optimizer),
        shards=shards,
        out_dir=tmp_path / name,
    )
    (tmp_path / f"{name}.json").write_text(spec.model_dump_json())
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [
        *(launcher if nproc > 1 else [sys.executable]),
        str(tmp_path / "worker.py"),
        str(tmp_path / f"{name}.json"),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ranks_match_one_process_with_one_all_reduce_per_step(tmp_path, optimizer):
    shards = make_shards(tmp_path / "shards", {"train": 200, "val": 40})
    single = launch(tmp_path, "single", shards, 1, optimizer)
    ddp = launch(tmp_path, "ddp", shards, 2, optimizer)  # 2 ranks x 2 micro-batches of 4 x 16 tokens

    assert ddp["all_reduces"] == 3  # one per optimizer step, none on the accumulation micro-step
    assert single["losses"].keys() == ddp["losses"].keys() == {"1", "2", "3"}
    for step, loss in single["losses"].items():
        assert abs(ddp["losses"][step] - loss) <= 1e-5 * loss, step
    expected = safetensors.torch.load_file(tmp_path / "single/checkpoints/step-3/model.safetensors")
    actual = safetensors.torch.load_file(tmp_path / "ddp/checkpoints/step-3/model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
