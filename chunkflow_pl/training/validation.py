"""What one validation pass gives: ``val/loss`` over the whole set and the loss by context position.

``val/loss`` = summed token cross-entropy / supervised tokens of the whole validation set (every batch, every
data-parallel rank): token-weighted, not a mean of per-batch means. ``val/ppl`` = exp of it. Per position
bucket (``data.val_position_buckets``) the same ratio over the tokens of that bucket
(``val/loss_by_position/<bucket>``, e.g. ``0-4K``) and its token count (``val/tokens_by_position/<bucket>``);
an empty bucket logs its count (0) and no loss. ``curve_*``: the same on power-of-two position bins, for the plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def size_label(n: int) -> str:
    """``4096 -> 4K``, ``1048576 -> 1M``, ``1000 -> 1000``, ``0 -> 0``."""
    if n == 0:
        return "0"
    for unit, factor in (("M", 1024**2), ("K", 1024)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def bucket_labels(edges: tuple[int, ...]) -> list[str]:
    """``(4096, 16384) -> ['0-4K', '4K-16K', '>16K']``."""
    lows = (0, *edges)
    return [f"{size_label(lo)}-{size_label(hi)}" for lo, hi in zip(lows, edges)] + [f">{size_label(edges[-1])}"]


def _ratios(loss: list[float], tokens: list[float]) -> list[float | None]:
    return [loss_sum / n if n > 0 else None for loss_sum, n in zip(loss, tokens)]


@dataclass(frozen=True)
class ValidationResult:
    loss: float  # sum of token CE / supervised tokens, whole validation set
    tokens: int  # supervised tokens of the whole validation set
    bucket_edges: tuple[int, ...]
    bucket_loss: tuple[float | None, ...]  # mean CE per bucket (None: no token there)
    bucket_tokens: tuple[int, ...]
    curve_edges: tuple[int, ...]
    curve_loss: tuple[float | None, ...]
    curve_tokens: tuple[int, ...]

    @classmethod
    def from_sums(cls, bucket_edges: tuple[int, ...], curve_edges: tuple[int, ...],
                  values: list[float]) -> ValidationResult:
        """From ``EvalSums.values()`` summed over the job: ``[bucket loss sums, bucket tokens, curve loss sums,
        curve tokens]``."""
        nb, nc = len(bucket_edges) + 1, len(curve_edges) + 1
        b_loss, b_tok = values[:nb], values[nb:2 * nb]
        c_loss, c_tok = values[2 * nb:2 * nb + nc], values[2 * nb + nc:2 * nb + 2 * nc]
        total = sum(b_tok)
        return cls(sum(b_loss) / total if total > 0 else math.nan, int(total), tuple(bucket_edges),
                   tuple(_ratios(b_loss, b_tok)), tuple(int(n) for n in b_tok), tuple(curve_edges),
                   tuple(_ratios(c_loss, c_tok)), tuple(int(n) for n in c_tok))

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def metrics(self) -> dict[str, float]:
        out = {"val/loss": self.loss, "val/ppl": self.ppl, "val/tokens": float(self.tokens)}
        for label, loss, n in zip(bucket_labels(self.bucket_edges), self.bucket_loss, self.bucket_tokens):
            if loss is not None:
                out[f"val/loss_by_position/{label}"] = loss
            out[f"val/tokens_by_position/{label}"] = float(n)
        return out
