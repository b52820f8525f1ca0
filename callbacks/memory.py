"""Memory of each ChunkFlow step, logged to the active logger(s).

::

    mem/host_rss_mib          resident set of this process at the end of the step
    mem/host_peak_rss_mib     its high-water mark (since the process started, or since the step started
                              with ``per_step_host_peak=True``)
    mem/cuda_max_alloc_mib    torch.cuda.max_memory_allocated during the step (CUDA only)
    mem/cuda_reserved_mib     memory held by the CUDA caching allocator at the end of the step
    mem/kv_state_mib          peak bytes of the key/value state store (keys/values of split sequences and
                              their gradient accumulators), from the step's ``StepStats``
    mem/live_chunks           most chunks holding activations at once (``<= chunk.k`` on one device)

``per_step_host_peak`` resets the kernel's peak-RSS counter at each step start (``/proc/self/clear_refs``),
which also resets ``getrusage``'s ``ru_maxrss`` for anything else in the process that reads it: off by
default. The CUDA peak is reset per step (the run-wide maximum is kept as ``max_cuda_allocated``).
"""

from __future__ import annotations

import lightning as L
import torch

from chunkflow_pl.utils.host_memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

MiB = 2**20


class MemoryMonitor(L.Callback):
    def __init__(self, per_step_host_peak: bool = False) -> None:
        self.per_step_host_peak = per_step_host_peak
        self.max_cuda_allocated = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.per_step_host_peak:
            self.per_step_host_peak = reset_peak_rss()
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = {"mem/host_rss_mib": current_rss_bytes() / MiB, "mem/host_peak_rss_mib": peak_rss_bytes() / MiB}
        device = trainer.strategy.root_device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            self.max_cuda_allocated = max(self.max_cuda_allocated, peak)
            out["mem/cuda_max_alloc_mib"] = peak / MiB
            out["mem/cuda_reserved_mib"] = torch.cuda.memory_reserved(device) / MiB
        stats = getattr(pl_module, "last_stats", None)
        if stats is not None:
            out["mem/kv_state_mib"] = stats.peak_state_bytes / MiB
            out["mem/live_chunks"] = float(stats.max_live_activations)
        pl_module.log_dict(out, batch_size=1)
