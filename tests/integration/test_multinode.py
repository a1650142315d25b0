"""Multi-node pretraining: two "nodes" on localhost meet at a c10d rendezvous.

Node 0 is the pretrain stage with `nnodes: 2` (it launches its own torchrun and writes
node.sh); node 1 runs that node.sh, as the other machine would, at the same time. The
result must match the same spec trained in one process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model.checkpoint import WEIGHTS
from model.config import ModelConfig
from model.errors import UserError
from model.train import RunSpec, run
from support import REPO
from support.configs import micro_pretrain_config
from support.corpus import make_shards
from support.ports import free_port
from tasks.pretrain import NODE_SCRIPT, PretrainConfig, run_pretrain, torchrun_args
from tasks.shard import ShardOutput

MODEL = ModelConfig(preset=None, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_two_nodes_on_localhost_match_one_process(tmp_path):
    manifest = make_shards(tmp_path / "shards", {"train": 200, "val": 40})
    shards = ShardOutput(path=manifest.parent, manifest=manifest, fingerprint="micro-shards", report={})
    config = micro_pretrain_config(
        max_steps=3,
        checkpoint_every=0,
        nnodes=2,
        nproc_per_node=1,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
    )

    node0: dict = {}
    stage = threading.Thread(target=lambda: node0.update(output=run_pretrain(config, MODEL, shards, tmp_path / "ws")))
    stage.start()
    deadline = time.monotonic() + 60
    while not (scripts := list((tmp_path / "ws").glob(f"pretrain/*/{NODE_SCRIPT}"))):
        assert stage.is_alive() and time.monotonic() < deadline, "the stage wrote no node.sh"
        time.sleep(0.1)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the venv's torchrun
    node1 = subprocess.Popen(
        ["sh", str(scripts[0])],
        cwd=REPO,
        env={**os.environ, "PATH": path},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        # Beyond torch's 300 s exit barrier: when node 0's agent, which hosts the rendezvous
        # store, leaves first, node 1's agent may wait it out before it exits (pytorch#69520).
        node1_output, _ = node1.communicate(timeout=360)
    except subprocess.TimeoutExpired:
        os.killpg(node1.pid, signal.SIGKILL)  # the agent and its worker
        pytest.fail(f"node 1 did not exit:\n{node1.communicate()[0][-3000:]}")
    stage.join(timeout=300)
    assert node1.returncode == 0, node1_output[-3000:]
    output = node0["output"]
    assert output.checkpoint.name == "step-3"

    # The same spec, in one process: 2 nodes x 1 micro-batch per step there, 2 micro-batches here.
    spec = RunSpec.model_validate_json((output.path / "spec.json").read_text())
    single = run(spec.model_copy(update={"out_dir": tmp_path / "single"}))
    assert output.metrics["train_loss"] == pytest.approx(single.train_loss, rel=1e-5)
    assert output.metrics["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    expected = safetensors.torch.load_file(single.checkpoint / WEIGHTS)
    actual = safetensors.torch.load_file(output.checkpoint / WEIGHTS)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def rendezvous(config: PretrainConfig) -> list[str]:
    return [arg for arg in torchrun_args(config, Path("spec.json"), "fp") if arg.startswith("--rdzv")]


def test_rendezvous_comes_from_the_config_then_the_environment(monkeypatch):
    for name in ("GPTFLOW_RDZV_ENDPOINT", "GPTFLOW_RDZV_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    one_node = torchrun_args(PretrainConfig(nproc_per_node=2), Path("spec.json"), "fp")
    assert one_node == ["--standalone", "--nproc_per_node=2", "-m", "tasks.pretrain_worker", "spec.json"]

    with pytest.raises(UserError, match="pretrain.rdzv_endpoint"):
        torchrun_args(PretrainConfig(nnodes=2), Path("spec.json"), "fp")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    assert rendezvous(PretrainConfig(nnodes=2)) == [
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29500",
        "--rdzv_id=fp",
    ]
    monkeypatch.setenv("GPTFLOW_RDZV_ENDPOINT", "head:1234")
    monkeypatch.setenv("GPTFLOW_RDZV_ID", "job-7")
    assert rendezvous(PretrainConfig(nnodes=2)) == [
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=head:1234",
        "--rdzv_id=job-7",
    ]
    assert rendezvous(PretrainConfig(nnodes=2, rdzv_endpoint="a:1", rdzv_id="b")) == [
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=a:1",
        "--rdzv_id=b",
    ]
