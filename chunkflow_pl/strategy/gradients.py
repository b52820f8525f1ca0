"""Gradient finishing after a step's last backward: tie the head, take the global norm, clip.

Data-parallel reduction is not done here: FSDP2 reduced the gradients over ``dp_replicate x dp_shard``
(``sharding.py``), so each rank holds its shard of the whole batch's gradient (the whole gradient with
one process per stage). What is left, once per step:

1. Tie: with tied embeddings and pp > 1, ``embed.weight`` lives on the first stage (embedding) and the
   last (LM head); each holds half of the gradient, so the two are summed. Both stages shard it the same
   way over the same data-parallel coordinate, so their local shards pair up (the tie group is rank
   ``(0, d)`` with ``(pp - 1, d)``).
2. Norm: the L2 norm of the whole model's gradient: squares of this rank's (local) gradient summed in
   float64 in parameter order, then over ``dp_shard`` (the shards of a stage; replicas hold the same
   shards and are not summed) and over the pipeline, the tied head counted once. Every rank gets the same
   number and takes the same clip or NaN decision.
3. Clip: every gradient scaled by ``max_norm / norm`` when the norm is larger (as ``clip_grad_norm_``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from chunkflow_pl.model.stages import StageSpec


@dataclass(frozen=True)
class GradGroups:
    """The groups gradient finishing uses (all ``None`` with one process)."""

    shard: Any | None  # dp_shard > 1: the ranks a stage's parameters are sharded over
    pp: Any | None
    tie: Any | None  # first and last stage of this replica (pp > 1 only)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard, else ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


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


def finish_gradients(model: torch.nn.Module, max_norm: float, groups: GradGroups, pp: int,
                     spec: StageSpec | None) -> torch.Tensor:
    """Tie, take the global norm (returned, before clipping), clip if ``max_norm > 0``.

    ``spec``: this rank's stage (``None`` when the strategy was not told the layer count: no tying).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = ensure_grads(p for _, p in named)
    tied = dict(named).get("embed.weight") if (pp > 1 and spec is not None and model.cfg.tie_word_embeddings) \
        else None
    if tied is not None and groups.tie is not None:
        dist.all_reduce(local(tied.grad), group=groups.tie)
    # The tied head on the last stage duplicates the first stage's embedding: count it once.
    exclude = {id(tied)} if tied is not None and spec is not None and not spec.takes_ids else None
    norm = global_grad_norm(params, groups.shard, groups.pp, exclude)
    if max_norm > 0:
        clip_grads_(params, max_norm, norm)
    return norm


def global_grad_norm(params: Sequence[torch.nn.Parameter], shard_group, pp_group,
                     exclude: set[int] | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the model (see the module docstring); ``exclude``: ids of parameters another
    stage also holds (the tied head) and counts."""
    device = local(params[0].grad).device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if exclude and id(p) in exclude:
            continue
        sq = sq + torch.linalg.vector_norm(local(p.grad).detach(), dtype=torch.float64) ** 2
    for group in (shard_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()


def clip_grads_(params: Sequence[torch.nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients by ``max_norm / total_norm`` when the norm is larger (as clip_grad_norm_)."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        g = local(p.grad).detach()
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
