"""Next-token targets, computed per WHOLE sequence before it is split into chunks.

Hugging Face convention: ``labels`` align with ``input_ids`` (``labels[t]`` is what token ``t`` *is*,
``-100`` where it must not be learned); the model shifts. We shift once, here, per sequence::

    t              0    1    2    3    4
    input_ids      a    b    c    d    e
    labels         -100 -100 c    d    e        (prompt a, b unsupervised)
    targets        -100 c    d    e    -100     targets[t] = labels[t + 1]; the last token has none

Because the shift happens before splitting, a chunk boundary inside a sequence keeps its target
(the last token of one piece predicts the first token of the next piece), and since every sequence
ends in ``-100``, nothing ever predicts across two different sequences packed side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from chunkflow_pl.data.types import IGNORE_INDEX

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


def _as_1d(x: ArrayLike, name: str) -> torch.Tensor | np.ndarray:
    if isinstance(x, torch.Tensor):
        out_t = x.to(torch.int64)
        if out_t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(out_t.shape)}")
        return out_t
    out_n = np.asarray(x, dtype=np.int64)
    if out_n.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {out_n.shape}")
    return out_n


def targets_from_labels(input_ids: ArrayLike, labels: ArrayLike | None = None) -> torch.Tensor | np.ndarray:
    """Return int64 ``targets_T`` with ``targets_T[t] = labels[t + 1]`` and ``targets_T[-1] = -100``.

    ``labels`` defaults to ``input_ids`` (plain language modelling). A torch input gives a torch
    tensor (same device), anything else a numpy array.
    """
    ids_T = _as_1d(input_ids, "input_ids")
    src_T = ids_T if labels is None else _as_1d(labels, "labels")
    if src_T.shape[0] != ids_T.shape[0]:
        raise ValueError(f"labels has {src_T.shape[0]} tokens but input_ids has {ids_T.shape[0]}")
    if isinstance(src_T, torch.Tensor):
        targets_T = torch.full_like(src_T, IGNORE_INDEX)
    else:
        targets_T = np.full_like(src_T, IGNORE_INDEX)
    targets_T[:-1] = src_T[1:]
    return targets_T


def num_supervised(targets: ArrayLike) -> int:
    """Number of tokens whose target is not ``IGNORE_INDEX`` (the loss denominator's share)."""
    if isinstance(targets, torch.Tensor):
        return int((targets != IGNORE_INDEX).sum().item())
    return int(np.count_nonzero(np.asarray(targets) != IGNORE_INDEX))


def num_supervised_from_labels(length: int, labels: np.ndarray | None) -> int:
    """Supervised targets of one sequence: targets[t] = labels[t+1], so labels[0] never counts."""
    if labels is None:
        return max(length - 1, 0)
    return int(np.count_nonzero(np.asarray(labels[1:]) != IGNORE_INDEX))
