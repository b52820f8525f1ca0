"""Gradient finishing after a step's last backward: tie, all-reduce over dp, global norm, clip.

The order and the collectives are ``grad_sync.py``'s (see there why there is no DDP wrapper); this
module decides, for this rank's stage, which parameter is the tied embedding and which groups apply.
The sharding issue replaces ``grad_sync``'s all-reduce with FSDP2's reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chunkflow_pl.model.stages import StageSpec
from chunkflow_pl.strategy import grad_sync


@dataclass(frozen=True)
class GradGroups:
    """The groups gradient finishing uses (all ``None`` with one process)."""

    dp: Any | None
    pp: Any | None
    tie: Any | None  # first and last stage of this replica (pp > 1 only)


def finish_gradients(model: torch.nn.Module, max_norm: float, groups: GradGroups, pp: int,
                     spec: StageSpec | None, bucket_mb: float) -> torch.Tensor:
    """Tie, all-reduce over dp, take the global norm (returned, before clipping), clip if ``max_norm > 0``.

    ``spec``: this rank's stage (``None`` when the strategy was not told the layer count: no tying).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = grad_sync.ensure_grads(p for _, p in named)
    tied = dict(named).get("embed.weight") if (pp > 1 and spec is not None and model.cfg.tie_word_embeddings) \
        else None
    grad_sync.tie_embedding_grads(tied, groups.tie)
    grad_sync.allreduce_grads(params, groups.dp, bucket_mb)
    # The tied head on the last stage duplicates the first stage's embedding: count it once.
    exclude = {id(tied)} if tied is not None and spec is not None and not spec.takes_ids else None
    norm = grad_sync.global_grad_norm(params, groups.pp, exclude)
    if max_norm > 0:
        grad_sync.clip_grads_(params, max_norm, norm)
    return norm
