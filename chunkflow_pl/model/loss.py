"""Summed cross-entropy over an LM head, in token slices (``model.loss_chunk``).

A 32K-token chunk with a 152K vocabulary would need 32K x 152K logits (20 GB in fp32). Each slice's
logits are recomputed in backward (activation checkpointing), so only one slice's logits exist at
any time; the value equals the plain ``cross_entropy(logits, labels, reduction="sum")``.
``token_cross_entropy`` is the per-token form for validation (no autograd, same slices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from chunkflow_pl.utils.constants import IGNORE_INDEX


def _slice_loss(h_SD: torch.Tensor, w_VD: torch.Tensor, y_S: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h_SD, w_VD)
    # Reduced precisions are upcast; float64 stays float64 (exactness tests).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, y_S, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor, slice_tokens: int
) -> torch.Tensor:
    T = hidden_TD.shape[0]
    if slice_tokens <= 0 or T <= slice_tokens:
        return _slice_loss(hidden_TD, weight_VD, labels_T)
    total = hidden_TD.new_zeros((), dtype=torch.promote_types(hidden_TD.dtype, torch.float32))
    for s in range(0, T, slice_tokens):
        y = labels_T[s : s + slice_tokens]
        if not bool((y != IGNORE_INDEX).any()):
            continue
        total = total + checkpoint(_slice_loss, hidden_TD[s : s + slice_tokens], weight_VD, y,
                                   use_reentrant=False)
    return total


def token_cross_entropy(
    hidden_TD: torch.Tensor, weight_VD: torch.Tensor, labels_T: torch.Tensor, slice_tokens: int
) -> torch.Tensor:
    """Cross-entropy of every token [T] (0 where the label is ignored), one slice of logits at a time, without
    autograd (validation): the same per-token values ``_slice_loss`` sums."""
    T = hidden_TD.shape[0]
    step = slice_tokens if slice_tokens > 0 else max(T, 1)
    out = hidden_TD.new_zeros((T,), dtype=torch.promote_types(hidden_TD.dtype, torch.float32))
    with torch.no_grad():
        for s in range(0, T, step):
            logits = F.linear(hidden_TD[s : s + step], weight_VD)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            out[s : s + step] = F.cross_entropy(logits, labels_T[s : s + step], ignore_index=IGNORE_INDEX,
                                                reduction="none")
    return out
