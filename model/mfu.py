"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

Achieved FLOP/s is `GPTConfig.flops_per_token(seq_len) * tokens/s` (6N + 12·L·T·d, PaLM
appendix B). On a GPU the peak is the datasheet's dense figure for the run's precision
(bf16 autocast: the bf16/fp16 tensor-core rate; otherwise fp32 matmuls run as TF32, which
training switches on); an accelerator the table does not know gets no MFU, and the reason
says so, rather than a guess. On the CPU the peak is measured: the best rate of large
matmuls in the run's dtype with the current thread settings, the ceiling a matmul-bound
step can reach.

`llmc_flops_per_token` is the count llm.c's train_gpt2.cu prints its MFU by, for comparing
figures with its runs: 6N + 6·L·C·T, with N every parameter as it allocates them (the token
embedding at the padded vocabulary, the position embeddings) and half our attention term
(the causal mask skips half the scores).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from model.config import GPTConfig
from model.device import device_model


@dataclass(frozen=True)
class DatasheetPeak:
    pattern: str  # a regex searched in torch.cuda.get_device_name(); the first match in the table wins
    model: str
    bf16: float  # dense bf16/fp16 tensor-core FLOP/s (fp32 accumulation)
    tf32: float  # dense TF32 tensor-core FLOP/s


# Dense (no 2:4 sparsity) peaks from the vendors' datasheets; where a datasheet quotes only
# the sparse figure (marked *), the dense one is half of it. More specific names come first
# ("H100 NVL" before "H100"); word boundaries keep "GH200" from matching "H200", "L40"
# from "L4" and "GB200" from "B200".
GPU_PEAKS = (
    # NVIDIA A100 datasheet (SXM4 and PCIe, 40/80 GB): BF16 312, TF32 156 TFLOPS.
    DatasheetPeak(r"\bA100\b.*(SXM|HGX)", "A100 SXM", 312e12, 156e12),
    DatasheetPeak(r"\bA100\b", "A100 PCIe", 312e12, 156e12),
    # NVIDIA H100 datasheet: SXM 1,979* / 989*, PCIe 1,513* / 756*, NVL 1,671* / 835* TFLOPS.
    # The SXM part reports itself as "NVIDIA H100 80GB HBM3".
    DatasheetPeak(r"\bH100 NVL\b", "H100 NVL", 835.5e12, 417.5e12),
    DatasheetPeak(r"\bH100\b.*PCIe", "H100 PCIe", 756e12, 378e12),
    DatasheetPeak(r"\bH100\b", "H100 SXM", 989.5e12, 494.5e12),
    # NVIDIA H200 datasheet: SXM 1,979* / 989*, NVL 1,671* / 835* TFLOPS.
    DatasheetPeak(r"\bH200 NVL\b", "H200 NVL", 835.5e12, 417.5e12),
    DatasheetPeak(r"\bH200\b", "H200 SXM", 989.5e12, 494.5e12),
    # NVIDIA GH200 Grace Hopper datasheet, the Hopper GPU: 1,979* / 989* TFLOPS.
    DatasheetPeak(r"\bGH200\b", "GH200", 989.5e12, 494.5e12),
    # NVIDIA HGX B200 datasheet, 8 GPUs: FP16/BF16 36* PFLOPS, TF32 18* PFLOPS.
    DatasheetPeak(r"\bB200\b", "B200", 2.25e15, 1.125e15),
    # NVIDIA L40S datasheet: BF16 362.05 (733*), TF32 183 (366*) TFLOPS.
    DatasheetPeak(r"\bL40S\b", "L40S", 362.05e12, 183e12),
    # NVIDIA L40 datasheet: BF16 181.05 (362.1*), TF32 90.5 (181*) TFLOPS.
    DatasheetPeak(r"\bL40\b", "L40", 181.05e12, 90.5e12),
    # NVIDIA L4 datasheet: BF16 242*, TF32 120* TFLOPS.
    DatasheetPeak(r"\bL4\b", "L4", 121e12, 60e12),
    # A10G (AWS G5): NVIDIA publishes no datasheet; AWS's figures, 70 BF16 / 35 TF32 TFLOPS.
    DatasheetPeak(r"\bA10G\b", "A10G", 70e12, 35e12),
    # NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: BF16 with FP32 accumulation
    # 165.2 (330.4*), TF32 82.6 (165.2*) TFLOPS.
    DatasheetPeak(r"\bRTX 4090\b", "RTX 4090", 165.2e12, 82.6e12),
    # AMD Instinct MI300X datasheet: FP16/BF16 1,307.4, TF32 653.7 TFLOPS (dense).
    DatasheetPeak(r"\bMI300X\b", "MI300X", 1307.4e12, 653.7e12),
)


def llmc_flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """llm.c's training FLOPs per token (gpt2_estimate_mfu): 6N + 6 * n_layer * n_embd * seq_len,
    N counting the token embedding at the padded vocabulary and the position embeddings."""
    padding = (config.padded_vocab_size - config.vocab_size) * config.n_embd
    return 6 * (config.num_params() + padding) + 6 * config.n_layer * config.n_embd * seq_len


@dataclass(frozen=True)
class Peak:
    """What MFU is measured against: FLOP/s, or None (no MFU), and where the figure comes from."""

    flops: float | None
    source: str  # e.g. "datasheet: H100 SXM, bf16 dense", or why there is no figure


def datasheet_peak(device_name: str, bf16: bool) -> Peak:
    """The table's figure for the first entry matching `device_name` (torch.cuda.get_device_name)."""
    precision = "bf16" if bf16 else "tf32"
    for entry in GPU_PEAKS:
        if re.search(entry.pattern, device_name):
            return Peak(entry.bf16 if bf16 else entry.tf32, f"datasheet: {entry.model}, {precision} dense")
    return Peak(None, f"no MFU: {device_name!r} is not in model/mfu.py's table of datasheet peaks")


def measure_matmul_flops(
    size: int = 1024, seconds: float = 0.5, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """The best FLOP/s of `size` x `size` matmuls in `dtype` over about `seconds` of trials."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout) alone
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    flops = 2 * size**3
    torch.mm(a, b)  # warm up the kernels and thread pool
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = max(best, 4 * flops / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, bf16: bool = False) -> Peak:
    """The peak that MFU is measured against on `device` at the run's precision."""
    if device.type == "cuda":
        return datasheet_peak(device_model(device), bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return Peak(measure_matmul_flops(device=device, dtype=dtype), f"measured: {dtype} matmuls on the CPU")
