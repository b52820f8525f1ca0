"""Validation data held out of the training data (``data.val_fraction``): a fixed split of the sequence indices.

The split depends only on (number of sequences, fraction, ``data.seed``): the same sequences are held out on
every run and every rank, whatever the batch size, chunk size or layout, so a resumed run validates on the
same set and never trains on it. Both parts are views (``SubsetStore``) of the one store: nothing is copied.
"""

from __future__ import annotations

import numpy as np

from chunkflow_pl.data.sources import TokenStore

_HOLDOUT_STREAM = 7  # keeps the split's stream apart from the shuffle (3) and the synthetic generator's streams


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, val_ids)``, each increasing: ``round(n * fraction)`` (at least 1) sequences held out,
    drawn uniformly; at least one is left to train on."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction={fraction} must be between 0 and 1 (exclusive)")
    m = max(1, int(round(n * fraction)))
    if m >= n:
        raise ValueError(f"data.val_fraction={fraction} of {n} sequences holds out {m}: nothing is left to train on")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _HOLDOUT_STREAM]))
    perm = rng.permutation(n)
    return np.sort(perm[m:]).astype(np.int64), np.sort(perm[:m]).astype(np.int64)


class SubsetStore:
    """The sequences ``ids`` of ``base``, renumbered ``0 .. len(ids) - 1`` (a ``TokenStore``)."""

    def __init__(self, base: TokenStore, ids: np.ndarray) -> None:
        self.base = base
        self.ids = np.asarray(ids, dtype=np.int64)
        self._lengths = np.asarray(base.lengths)[self.ids]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return int(self.ids.size)

    def tokens(self, i: int) -> np.ndarray:
        return self.base.tokens(int(self.ids[i]))

    def labels(self, i: int) -> np.ndarray | None:
        return self.base.labels(int(self.ids[i]))

    @property
    def skipped_records(self) -> int:
        return int(getattr(self.base, "skipped_records", 0))

    @property
    def cache_hit(self) -> bool:
        return bool(getattr(self.base, "cache_hit", False))
