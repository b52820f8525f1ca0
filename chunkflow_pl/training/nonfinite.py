"""Non-finite loss or gradients: decided once per step, before the optimizer touches the weights.

The decision uses only values every rank shares after the step's reductions (the global loss and the
global gradient norm, summed / all-reduced over data-parallel and pipeline ranks), so all ranks
take the same branch without another collective. Policies (``optim.on_nonfinite``):

* ``error`` (default): stop with ``NonFiniteError`` naming the step; the weights, the optimizer
  state and every checkpoint already written stay those of the last good step.
* ``skip``: drop the step's gradients, leave weights, optimizer and lr schedule untouched, count
  it (``train/skipped_steps``) and go on with the next batch; ``optim.max_consecutive_skips``
  skipped steps in a row stop the run (the model is not recovering).

Writers check too (``assert_finite``): a checkpoint or Hugging Face export is never written from
non-finite weights, whatever produced them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

ON_NONFINITE = ("error", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight; nothing was written from it."""


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm over all gradients (0 when none): the global norm once gradients are reduced."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def step_is_finite(loss: float, norm: float) -> bool:
    return math.isfinite(loss) and math.isfinite(norm)


def describe(step: int, loss: float, norm: float) -> str:
    return f"step {step}: loss={loss} global gradient norm={norm} is not finite"


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def assert_finite(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise ``NonFiniteError`` before ``what`` is written if any tensor is non-finite."""
    bad = nonfinite_tensors(named)
    if bad:
        raise NonFiniteError(f"refusing to write {what}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:4])}"
                             f"{', ...' if len(bad) > 4 else ''}); lower optim.lr, check the data, or resume from "
                             f"the last good checkpoint")
