"""The MFU peak: the datasheet figure picked by the name the driver reports and the run's
precision; no figure (and the reason) for an accelerator the table does not know."""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.mfu import datasheet_peak, llmc_flops_per_token, peak_flops

# (torch.cuda.get_device_name(), bf16 peak, tf32 peak), as in each vendor's datasheet (dense).
KNOWN = [
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 156e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12, 494.5e12),  # the SXM part
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835.5e12, 417.5e12),  # not the SXM figure
    ("NVIDIA H200", 989.5e12, 494.5e12),
    ("NVIDIA H200 NVL", 835.5e12, 417.5e12),
    ("NVIDIA GH200 480GB", 989.5e12, 494.5e12),
    ("NVIDIA B200", 2.25e15, 1.125e15),
    ("NVIDIA L4", 121e12, 60e12),
    ("NVIDIA L40", 181.05e12, 90.5e12),  # not the L4's figure
    ("NVIDIA L40S", 362.05e12, 183e12),
    ("NVIDIA A10G", 70e12, 35e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 82.6e12),
    ("AMD Instinct MI300X", 1307.4e12, 653.7e12),
]


@pytest.mark.parametrize(("name", "bf16_peak", "tf32_peak"), KNOWN, ids=[name for name, _, _ in KNOWN])
def test_the_table_picks_by_device_name_and_precision(name, bf16_peak, tf32_peak):
    bf16, tf32 = datasheet_peak(name, bf16=True), datasheet_peak(name, bf16=False)
    assert (bf16.flops, tf32.flops) == (bf16_peak, tf32_peak)
    assert bf16.source.startswith("datasheet: ") and bf16.source.endswith("bf16 dense")
    assert tf32.source.endswith("tf32 dense")


@pytest.mark.parametrize("name", ["NVIDIA GB200", "Some Future Accelerator", "Tesla V100-SXM2-16GB"])
def test_an_unknown_accelerator_gets_no_mfu_and_the_reason(name):
    peak = datasheet_peak(name, bf16=True)
    assert peak.flops is None
    assert peak.source == f"no MFU: {name!r} is not in model/mfu.py's table of datasheet peaks"


def test_a_gpu_run_takes_the_name_torch_reports(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert peak_flops(torch.device("cuda", 0), bf16=True).flops == 835.5e12


def test_the_cpu_keeps_a_measured_peak_in_the_runs_dtype():
    fp32, bf16 = peak_flops(torch.device("cpu")), peak_flops(torch.device("cpu"), bf16=True)
    assert fp32.flops > 0 and fp32.source == "measured: torch.float32 matmuls on the CPU"
    assert bf16.flops > 0 and bf16.source == "measured: torch.bfloat16 matmuls on the CPU"


def test_llmc_count_matches_llmc_own_gpt2_parameter_count():
    # llm.c's train_gpt2.cu prints "num_parameters: 124475904" for GPT-2 124M (vocabulary padded
    # to 50,304, 1,024 positions) and counts 6N + 6 * L * C * T FLOPs per token.
    expected = 6 * 124_475_904 + 6 * 12 * 768 * 1024
    assert llmc_flops_per_token(preset("gpt2-small"), 1024) == expected
