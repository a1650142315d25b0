"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

Achieved FLOP/s is `GPTConfig.flops_per_token(seq_len) * tokens/s` (6N + 12·L·T·d, PaLM
appendix B). The peak is the datasheet's dense figure for known GPUs, and on a CPU (or an
unknown GPU) it is measured: the best rate of large fp32 matmuls with the current thread
settings, which is the ceiling a transformer's matmul-bound step can reach.
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) peak FLOP/s from vendor datasheets: (bf16/fp16 tensor core, tf32).
GPU_PEAK_FLOPS = {
    "H100 SXM": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),  # before "L4", which its name contains
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def gpu_peak_flops(device_name: str, bf16: bool) -> float | None:
    """The table's figure for the first (most specific) name contained in `device_name`."""
    for name, (half, tf32) in GPU_PEAK_FLOPS.items():
        if name in device_name:
            return half if bf16 else tf32
    return None


def measure_matmul_flops(size: int = 1024, seconds: float = 0.5, device: torch.device | str = "cpu") -> float:
    """The best FLOP/s of `size` x `size` fp32 matmuls over about `seconds` of trials."""
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG (dropout) alone
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
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


def peak_flops(device: torch.device, bf16: bool = False) -> float:
    """The FLOP/s that MFU is measured against on `device`."""
    if device.type == "cuda":
        known = gpu_peak_flops(torch.cuda.get_device_name(device), bf16)
        if known:
            return known
    return measure_matmul_flops(device=device)
