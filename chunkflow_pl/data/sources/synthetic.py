"""Synthetic long-context fine-tuning data shaped like LMSys-Chat-1M (DESIGN.md): a long tail.

Lengths: a log-normal body (median ``BODY_MEDIAN`` tokens, sigma ``BODY_SIGMA``), so over 99% of
sequences are under 4K tokens, plus a rare tail (``TAIL_FRACTION`` of sequences) drawn log-uniform in
``[4K, max_len]``; everything is clipped to ``[min_len, max_len]``. All lengths are drawn at once with
numpy (100k lengths take milliseconds), so planning and statistics never touch tokens.

Tokens: a walk on a fixed random sparse Markov chain over the vocabulary (each token has
``SUCCESSORS`` likely successors with fixed probabilities). The next-token entropy is ~1.1 nats
against ln(vocab) for a uniform guess, so even a tiny model's loss falls visibly within ~100 steps.
Sequence ``i`` is generated on demand from ``(seed, i)`` alone: a 256K-token sequence costs nothing
until a batch actually contains it, and any worker process regenerates the same tokens.
"""

from __future__ import annotations

from array import array

import numpy as np

BODY_MEDIAN = 256
BODY_SIGMA = 1.0
TAIL_START = 4096
TAIL_FRACTION = 0.005
SUCCESSORS = 4
SUCCESSOR_PROBS = (0.55, 0.25, 0.12, 0.08)

# Separate random streams so that changing one aspect (e.g. vocab size) does not reshuffle lengths.
_LENGTHS, _CHAIN, _TOKENS = 0, 1, 2


def synthetic_lengths(num_sequences: int, max_len: int, min_len: int = 2, seed: int = 0) -> np.ndarray:
    """int64 [num_sequences] long-tailed lengths, deterministic in ``seed``."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len ({min_len}) <= max_len ({max_len})")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _LENGTHS]))
    body = rng.lognormal(mean=np.log(BODY_MEDIAN), sigma=BODY_SIGMA, size=num_sequences)
    in_tail = rng.random(num_sequences) < TAIL_FRACTION
    lengths = body
    if max_len > TAIL_START:
        tail = np.exp(rng.uniform(np.log(TAIL_START), np.log(max_len), size=num_sequences))
        lengths = np.where(in_tail, tail, body)
    return np.clip(np.rint(lengths), min_len, max_len).astype(np.int64)


class SyntheticStore:
    """``TokenStore`` of generated sequences; every token is supervised (``labels`` is None)."""

    def __init__(self, num_sequences: int, max_len: int, min_len: int, vocab_size: int, seed: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"synthetic data needs vocab_size >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self._lengths = synthetic_lengths(num_sequences, max_len, min_len, seed)
        self._succ: array | None = None  # flat [vocab * k] table, built on first use (per process)
        self._k = min(SUCCESSORS, self.vocab_size)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def labels(self, i: int) -> np.ndarray | None:
        return None

    def _successors(self) -> array:
        if self._succ is None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, _CHAIN]))
            table = rng.integers(0, self.vocab_size, size=self.vocab_size * self._k, dtype=np.int64)
            # a stdlib array: the walk below indexes scalars, several times faster than on numpy
            self._succ = array("q", table.tobytes())
        return self._succ

    def tokens(self, i: int) -> np.ndarray:
        n = int(self._lengths[i])
        succ = self._successors()
        k = self._k
        probs = np.asarray(SUCCESSOR_PROBS[:k], dtype=np.float64)
        cum = np.cumsum(probs / probs.sum())
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _TOKENS, int(i)]))
        x = int(rng.integers(0, self.vocab_size))
        picks = np.minimum(np.searchsorted(cum, rng.random(n - 1), side="right"), k - 1).tolist()
        out = [x]
        append = out.append
        for c in picks:  # inherently sequential: a Markov walk
            x = succ[x * k + c]
            append(x)
        return np.asarray(out, dtype=np.int64)

    def __getstate__(self) -> dict:
        # workers rebuild the successor table instead of receiving it pickled
        state = dict(self.__dict__)
        state["_succ"] = None
        return state
