"""FSDP2's gradient reduce-scatter on gloo, as an all-reduce of the same buffer and a slice of it.

gloo's ``reduce_scatter`` is far slower than its ``all_reduce``: measured on the 2-core CPU machine of this
project, 2 processes, a 120 MB float32 buffer (the benchmark model's gradients), reduce-scatter 0.33-0.78 s,
all-reduce of the whole buffer then keeping this rank's slice 0.15-0.27 s (the all-reduce alone 0.15-0.21 s).
FSDP2 reduces with ``reduce_scatter`` once per reduce, and ``parallel.grad_reduce=every_backward`` reduces after
every chunk's backward, so on CPU runs this was the largest cost of sharding (``benchmarks/sharding.py``).

The all-reduce sums the same values: with 2 ranks ``a + b`` is bitwise ``b + a``; with more, gloo's all-reduce
may add in another order than its reduce-scatter would, a rounding difference, the same on every rank and
every run. FSDP2 hands the comm a temporary input buffer (its copy-in of the unsharded gradients) that it does
not read again, so reducing it in place costs no memory beyond what the reduce-scatter already held. NCCL keeps
FSDP2's own reduce-scatter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter


class AllReduceScatter(ReduceScatter):
    """``ReduceScatter`` for ``FSDPModule.set_custom_reduce_scatter``: all-reduce ``input``, copy out this rank's
    contiguous 1/world slice (FSDP2's reduce-scatter layout: rank r's shard is the r-th equal part)."""

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: dist.ReduceOp, async_op: bool = False) -> dist.Work | None:
        if async_op:  # FSDP2 calls it synchronously; an async caller would read the output too early
            raise NotImplementedError("AllReduceScatter is synchronous")
        dist.all_reduce(input_tensor, op=op, group=group)
        world, rank = group.size(), group.rank()
        output_tensor.copy_(input_tensor.view(world, -1)[rank])
        return None
