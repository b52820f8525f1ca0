"""After a step's last backward: sum gradients over data parallelism, tie the head, measure and clip.

No DDP wrapper: a chunk step runs many backward calls (DDP's reducer expects one forward per synced
backward), and chunks of one replica need no synchronisation until the step ends. So, once per step:

1. ``tie_embedding_grads``: with tied embeddings and pp > 1, ``embed.weight`` lives on the first stage
   (embedding) and the last (LM head); each holds half of the gradient, so the two are summed.
2. ``allreduce_grads``: gradients summed over the data-parallel group, in flat buckets (one collective
   per ~``bucket_mb`` MiB instead of one per parameter). The loss is already divided by the global
   supervised-token count, so the sum is the whole batch's gradient.
3. ``global_grad_norm``: the L2 norm over the whole model: squares summed over this stage's parameters
   (the tied head counted once), then over the pipeline. After 2 every data-parallel rank holds the
   same gradients, so every rank computes the same norm, and takes the same clip or NaN decision.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def ensure_grads(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Give every trainable parameter a gradient (zeros where no chunk touched it) so collectives match."""
    out = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p)
    return out


def _buckets(params: Sequence[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if buckets and size + nbytes <= bucket_bytes and buckets[-1][0].grad.dtype == p.grad.dtype:
            buckets[-1].append(p)
            size += nbytes
        else:
            buckets.append([p])
            size = nbytes
    return buckets


def allreduce_grads(params: Sequence[torch.nn.Parameter], group, bucket_mb: float = 25.0) -> int:
    """Sum ``.grad`` over ``group`` in flat buckets (in parameter order, so every rank pairs the same
    buckets); returns the number of collectives issued."""
    if group is None or dist.get_world_size(group) == 1:
        return 0
    n = 0
    for bucket in _buckets(params, int(bucket_mb * 2**20)):
        if len(bucket) == 1:
            dist.all_reduce(bucket[0].grad, group=group)
        else:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            dist.all_reduce(flat, group=group)
            offset = 0
            for p in bucket:
                k = p.grad.numel()
                p.grad.copy_(flat[offset:offset + k].view_as(p.grad))
                offset += k
        n += 1
    return n


def tie_embedding_grads(weight: torch.nn.Parameter | None, group) -> None:
    """Sum the tied ``embed.weight`` gradient between the first and last stage (``group`` = those two)."""
    if weight is not None and group is not None:
        dist.all_reduce(weight.grad, group=group)


def global_grad_norm(params: Sequence[torch.nn.Parameter], pp_group, exclude: set[int] | None = None
                     ) -> torch.Tensor:
    """L2 norm of all gradients of the model. ``exclude``: ids of parameters another stage also holds
    (the tied head) and counts. Accumulated in float64 on the host order of parameters (deterministic)."""
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if exclude and id(p) in exclude:
            continue
        sq = sq + torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def clip_grads_(params: Sequence[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients by ``max_norm / total_norm`` when the norm is larger (as clip_grad_norm_)."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(device=p.grad.device, dtype=p.grad.dtype))
