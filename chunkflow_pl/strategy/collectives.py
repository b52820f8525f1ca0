"""The strategy's collectives: Lightning's ``reduce`` / ``barrier`` / ``broadcast`` and the step's scalar sums.

``reduce`` takes torch's ``dist.ReduceOp``, or one of the strings Lightning hands a strategy: its
documented ``"mean"`` (alias ``"avg"``) and ``"sum"``, and ``"max"`` / ``"min"``, which
``LightningModule.log(..., reduce_fx=max, sync_dist=True)`` passes as the reduction's name. Each string
is looked up exactly in ``_LIGHTNING_OPS``; anything else raises ``ValueError``. A mean is a sum
divided by the group's size on every backend (gloo has no ``AVG``), so it is exact wherever a sum is.

Every function is a no-op without an initialised process group (one process): the value comes back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_LIGHTNING_OPS = {"mean": "mean", "avg": "mean", "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                  "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_reduce_op(reduce_op: dist.ReduceOp | str | None) -> tuple[dist.ReduceOp, bool]:
    """``(op for all_reduce, divide by the group size after it)`` for Lightning's ``reduce_op`` argument.

    ``None`` is a sum, as in Lightning's own ``_sync_ddp``.
    """
    if reduce_op is None:
        return dist.ReduceOp.SUM, False
    if isinstance(reduce_op, dist.ReduceOp):
        if reduce_op == dist.ReduceOp.AVG:
            return dist.ReduceOp.SUM, True
        return reduce_op, False
    if isinstance(reduce_op, str):
        op = _LIGHTNING_OPS.get(reduce_op)
        if op is None:
            raise ValueError(f"reduce_op={reduce_op!r}: ChunkFlowStrategy.reduce takes a torch.distributed.ReduceOp "
                             f"or one of {sorted(_LIGHTNING_OPS)}")
        return (dist.ReduceOp.SUM, True) if op == "mean" else (op, False)
    raise ValueError(f"reduce_op={reduce_op!r} ({type(reduce_op).__name__}): ChunkFlowStrategy.reduce takes a "
                     f"torch.distributed.ReduceOp or one of {sorted(_LIGHTNING_OPS)}")


def reduce(tensor: Any, group: Any | None = None, reduce_op: dist.ReduceOp | str | None = "mean") -> Any:
    """All-reduce a copy of ``tensor`` over ``group`` (default: every rank); non-tensors come back unchanged."""
    op, mean = resolve_reduce_op(reduce_op)  # a bad op fails with one process too
    if not isinstance(tensor, torch.Tensor) or not initialized():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=op, group=group)
    return out / dist.get_world_size(group) if mean else out


def barrier(device: torch.device) -> None:
    if initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_reduce_scalars(values: list[float], group: Any | None, device: torch.device,
                       op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
    """A few scalars reduced over ``group`` in float64, one collective; ``group=None``: nothing to reduce."""
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()
