"""Non-finite loss or gradients: decided once per step, before the optimizer touches the weights.

The decision uses only values every rank shares after the step's reductions (the global loss and the
global gradient norm, summed / all-reduced over data-parallel and pipeline ranks), so all ranks
take the same branch without another collective. Policies (``optim.on_nonfinite``):

* ``error`` (default): stop with ``NonFiniteError`` naming the step; the weights, the optimizer
  state and every checkpoint already written stay those of the last good step.
* ``skip``: drop the step's gradients, leave weights, optimizer and lr schedule untouched, count
  it (``train/skipped_steps``) and go on with the next batch; ``optim.max_consecutive_skips``
  skipped steps in a row stop the run (the model is not recovering).

Writers check too: a checkpoint or Hugging Face export is never written from non-finite weights,
whatever produced them (a checkpoint is written by every rank together, so the count of non-finite
tensors is summed over ranks first and all refuse together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

ON_NONFINITE = ("error", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing was written from it."""


def step_is_finite(loss: float, norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(norm)


def describe(step: int, loss: float, norm: float) -> str:
    return f"step {step}: loss={loss} global gradient norm={norm} is not finite"


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def refusal(what: str, bad: list[str], total: int | None = None) -> NonFiniteError:
    """The error for writing ``what`` from weights of which ``bad`` (names, this rank) / ``total`` are non-finite."""
    names = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
    return NonFiniteError(f"refusing to write {what}: {total if total is not None else len(bad)} tensors hold NaN or "
                          f"inf ({names or 'on other ranks'}); lower optim.lr, check the data, or resume from the last "
                          f"good checkpoint")


def assert_finite(named: Iterable[tuple[str, torch.Tensor]], what: str,
                  sum_over_ranks: Callable[[int], int] | None = None) -> None:
    """Raise ``NonFiniteError`` before ``what`` is written if any tensor is non-finite. ``sum_over_ranks``: the
    count summed over the ranks that write ``what`` together (each holds part of the weights), so that all of
    them refuse, not one while the others wait in the collective write."""
    bad = nonfinite_tensors(named)
    total = sum_over_ranks(len(bad)) if sum_over_ranks is not None else len(bad)
    if total:
        raise refusal(what, bad, total)


def strategy_sum(strategy: Any, device: torch.device) -> Callable[[int], int]:
    """``sum_over_ranks`` through a Lightning strategy's ``reduce`` (identity on one process)."""
    return lambda n: int(strategy.reduce(torch.tensor(float(n), device=device), reduce_op="sum"))
