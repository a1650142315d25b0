"""The `device` settings: resolution against this machine (a GPU stood in for by patching
torch.cuda), the checks a run makes before any stage, the configs for real models, and that
no fingerprint depends on the device."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from flows.pipeline_config import PipelineConfig, load_config
from flows.plan import plan
from flows.run.preflight import check_run
from model.device import describe_device, resolve_device, training_bf16
from model.errors import UserError
from support import REPO
from support.devices import stand_in_gpus
from tasks.finetune import FinetuneConfig
from tasks.pretrain import pretrain_fingerprint

CONFIGS = REPO / "configs"


def test_auto_is_the_first_gpu_else_the_cpu(monkeypatch):
    stand_in_gpus(monkeypatch, [])
    assert resolve_device("auto") == torch.device("cpu")
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # under torchrun
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe_device("auto") == "auto -> cuda:0 (NVIDIA H100 80GB HBM3)"


@pytest.mark.parametrize(
    ("gpus", "name", "message"),
    [
        ([], "cuda", "pretrain.device: cuda needs a CUDA device; this machine has no CUDA device (only the CPU)"),
        (
            ["NVIDIA L4"],
            "cuda:3",
            "pretrain.device: cuda:3 is not a device here; this machine has 1 CUDA device: cuda:0 (NVIDIA L4)",
        ),
        ([], "gpu", "pretrain.device: 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
        ([], "cuda:x", "pretrain.device: 'cuda:x' is not a device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_one_error_naming_the_field(monkeypatch, gpus, name, message):
    stand_in_gpus(monkeypatch, gpus)
    with pytest.raises(UserError) as error:
        resolve_device(name, "pretrain.device")
    assert str(error.value) == message


def test_bf16_on_a_gpu_without_it_is_refused_and_off_by_default(monkeypatch):
    stand_in_gpus(monkeypatch, ["Tesla V100-SXM2-16GB"], bf16=False)
    gpu = resolve_device("cuda")
    with pytest.raises(UserError, match=r"pretrain.bf16: true, but cuda:0 \(Tesla V100-SXM2-16GB\) has no bf16"):
        training_bf16(gpu, True, "pretrain.bf16")
    assert training_bf16(gpu, None) is False
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3"])
    assert training_bf16(gpu, None) is True
    assert training_bf16(torch.device("cpu"), None) is False  # the CPU trains in fp32 unless asked


def config_with(**fields) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "device-test", **fields})


def test_training_sections_default_to_the_pipeline_device():
    config = config_with(device="cuda:1")
    assert config.pretrain.device == config.finetune.device == "cuda:1"
    config = config_with(device="cuda:1", pretrain={"device": "cpu"}, finetune={"device": "cuda"})
    assert (config.pretrain.device, config.finetune.device) == ("cpu", "cuda")
    assert config_with(finetune=None).pretrain.device == "auto"
    with pytest.raises(ValueError, match="'tpu' is not a device"):
        config_with(pretrain={"device": "tpu"})


def test_no_fingerprint_depends_on_the_device(tmp_path):
    on_cpu = config_with(device="cpu", workspace=str(tmp_path))
    on_gpu = config_with(device="cuda:3", workspace=str(tmp_path))
    fingerprints = {pretrain_fingerprint(config.pretrain, config.model, "shards") for config in (on_cpu, on_gpu)}
    assert len(fingerprints) == 1
    assert on_cpu.finetune.settings() == on_gpu.finetune.settings()
    assert [stage.fingerprint for stage in plan(on_cpu)] == [stage.fingerprint for stage in plan(on_gpu)]
    assert "device" in FinetuneConfig.model_fields  # the exclusion above is not vacuous


@pytest.mark.parametrize(
    ("gpus", "fields", "message"),
    [
        ([], {"device": "cuda"}, "device: cuda needs a CUDA device"),
        (
            ["NVIDIA A100-SXM4-80GB"],
            {"finetune": {"device": "cuda:1"}},
            "finetune.device: cuda:1 is not a device here; this machine has 1 CUDA device: cuda:0 (NVIDIA A100-SXM4",
        ),
        (
            ["NVIDIA A100-SXM4-80GB"],
            {"device": "cuda", "pretrain": {"nproc_per_node": 2, "batch_tokens": 4096}},
            "pretrain.nproc_per_node: 2 processes, one per GPU, but this machine has 1 CUDA device",
        ),
        (
            ["NVIDIA A100-SXM4-80GB"] * 2,
            {"pretrain": {"device": "cuda:1", "nproc_per_node": 2}},
            "pretrain.device: cuda:1 names one device, but pretrain.nproc_per_node is 2",
        ),
        (
            ["Tesla T4"],
            {"device": "cuda", "pretrain": {"bf16": True}},
            "pretrain.bf16: true, but cuda:0 (Tesla T4) has no bf16",
        ),
        (
            [],
            {"pretrain": {"micro_batch_size": 3}},
            "pretrain.batch_tokens (4096) must be a multiple of pretrain.micro_batch_size x seq_len x processes = 3 x",
        ),
        (
            [],
            {"finetune": {"micro_batch_size": 3}},
            "finetune.batch_tokens (2048) must be a multiple of finetune.micro_batch_size x seq_len x processes = 3 x",
        ),
    ],
)
def test_a_run_checks_devices_and_batch_shapes_first(monkeypatch, gpus, fields, message):
    stand_in_gpus(monkeypatch, gpus, bf16=gpus != ["Tesla T4"])
    config = config_with(**fields)
    with pytest.raises(UserError) as error:
        check_run(config)
    assert str(error.value).startswith(message)


def test_a_run_on_a_machine_with_the_device_passes_its_checks(monkeypatch):
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3"] * 8)
    check_run(config_with(device="cuda:7"))
    check_run(config_with(device="cuda", pretrain={"nproc_per_node": 8, "batch_tokens": 8 * 8 * 256}))
    check_run(load_config(CONFIGS / "gpt2-small.yaml"))
    check_run(load_config(CONFIGS / "gpt3-small.yaml"))


def test_a_registered_base_defers_the_finetune_batch_check_to_its_own_context():
    # finetune rows are the base model's context long: unknown until a registered base loads.
    check_run(config_with(finetune={"micro_batch_size": 3}), training=("finetune",), finetune_from="models:/m@champion")


@pytest.mark.parametrize(
    ("name", "seq_len", "micro_batch", "layers"),
    [("gpt2-small", 1024, 64, ["dense"]), ("gpt3-small", 2048, 32, ["dense", "sparse"])],
)
def test_the_gpu_configs_load_and_plan_here(monkeypatch, tmp_path, name, seq_len, micro_batch, layers):
    config = load_config(CONFIGS / f"{name}.yaml")
    model = config.model.resolve(vocab_size=config.bpe.vocab_size)
    assert (config.device, config.pretrain.device) == ("auto", "auto")
    assert config.pretrain.bf16 and config.pretrain.compile
    assert config.shard.seq_len == model.block_size == seq_len and model.attention == layers
    assert config.pretrain.batch_tokens == 2**19 and config.pretrain.micro_batch_size == micro_batch
    assert config.ingest.source.startswith("hf:") and config.ingest.streaming
    if name == "gpt2-small":  # FineWeb-Edu: prose, deduplicated upstream
        assert (config.ingest.filters.preset, config.ingest.filters.near_dedup) == ("web", False)
    assert 120e6 < model.num_params() < 170e6

    dry_run = ["run", str(CONFIGS / f"{name}.yaml"), "--dry-run", "--set", f"workspace={tmp_path}"]
    stand_in_gpus(monkeypatch, [])
    result = CliRunner().invoke(app, dry_run)
    assert result.exit_code == 0, result.output
    assert "pretrain.device  auto -> cpu (CPU)" in result.output
    assert "pretrain                 run     pretrain/" in result.output
    stand_in_gpus(monkeypatch, ["NVIDIA H100 80GB HBM3"])
    assert "device           auto -> cuda:0 (NVIDIA H100 80GB HBM3)" in CliRunner().invoke(app, dry_run).output
