"""An achievable matmul peak: the default "peak FLOP/s" of MFU and of the planner's cost model.

The best rate of a few square matrix products in the training dtype on the training device. It is
lower than a datasheet's peak (clocks, memory, the shared CPU); give the datasheet value explicitly
(``callbacks.throughput.peak_flops``, ``plan.flops_per_s``) to compare against that instead.
"""

from __future__ import annotations

import time

import torch

# Lightning precision -> the dtype matrix products run in
_MATMUL_DTYPES = {"64": torch.float64, "32": torch.float32, "bf16": torch.bfloat16, "16": torch.float16}


def matmul_dtype(precision: str) -> torch.dtype:
    return _MATMUL_DTYPES[str(precision).split("-")[0]]


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of ``n x n`` matrix products over about ``seconds`` (n = 1024 on CPU, 8192 on CUDA)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    if not cuda and dtype in (torch.bfloat16, torch.float16):
        n = 512  # CPU half-precision products are slow; keep the probe short
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, thread pool start
    best = float("inf")
    spent, tries = 0.0, 0
    while tries < 3 or (spent < seconds and tries < 50):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, tries = min(best, dt), spent + dt, tries + 1
    return 2.0 * n**3 / best
