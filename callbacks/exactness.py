"""Opt-in live exactness probe: every N steps, is the chunked gradient still the unchunked one?

After a training step, takes the split sequence of the step's batch with the most pieces (at most
``max_tokens`` long, so its unchunked backward fits), recomputes its gradient chunked exactly as the step
cut it and unchunked, and logs::

    probe/grad_rel_diff     ||g_chunked - g_whole|| / ||g_whole||   (~1e-12 in float64, ~1e-6 in float32)
    probe/seq_len, probe/pieces

Past ``tolerance`` it raises ``ExactnessError`` (stopping the run) or, with ``on_fail=warn``, logs an
error and goes on. ``tolerance=null`` picks one by precision (``DEFAULT_TOLERANCE``). Steps without a
split sequence short enough log nothing. The training step's gradients and weights are not changed
(see ``chunkflow_pl/training/exactness.py``); the probe costs about one more step on that sequence.

Data parallelism: the probe is rank-local (each rank checks a sequence of its own share on its own
replica, no collective). Pipeline parallelism: a stage does not hold the whole model, so the probe
is skipped (with a warning).
"""

from __future__ import annotations

import logging

import lightning as L

from chunkflow_pl.training.exactness import pick_sequence, probe_sequence

log = logging.getLogger(__name__)
# Relative gradient difference allowed by precision: float64 rounding, float32 rounding over long
# reductions, bf16 activations (chunked and whole differ in the order of their reductions).
DEFAULT_TOLERANCE = {"64": 1e-9, "32": 1e-4, "bf16": 5e-2, "16": 5e-2}


class ExactnessError(RuntimeError):
    """The chunked gradient of a sequence differs from its unchunked gradient beyond the tolerance."""


class ExactnessProbe(L.Callback):
    def __init__(self, every_n_steps: int = 0, max_tokens: int = 16384, tolerance: float | None = None,
                 on_fail: str = "raise") -> None:
        if every_n_steps < 0 or max_tokens < 2:
            raise ValueError(f"callbacks.exactness: every_n_steps={every_n_steps} must be >= 0 (0 = off) and "
                             f"max_tokens={max_tokens} >= 2")
        if on_fail not in ("raise", "warn"):
            raise ValueError(f"callbacks.exactness.on_fail={on_fail!r}: choose raise or warn")
        self.every = int(every_n_steps)
        self.max_tokens = int(max_tokens)
        self.tolerance = tolerance
        self.on_fail = on_fail
        self.results: list = []  # ProbeResult of every probe run (this process)
        self._warned = False

    def _tolerance(self, trainer) -> float:
        if self.tolerance is not None:
            return float(self.tolerance)
        return DEFAULT_TOLERANCE[str(trainer.precision).split("-")[0]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every or trainer.global_step % self.every:
            return
        model = pl_module.model
        if not (model.stage.takes_ids and model.stage.has_head):
            if not self._warned:
                log.warning("exactness probe skipped: this rank holds pipeline stage %s, not the whole model",
                            model.stage)
                self._warned = True
            return
        seq = pick_sequence(batch, self.max_tokens)
        if seq is None:
            return
        strategy = trainer.strategy
        result = probe_sequence(model, batch, seq, strategy.root_device, int(getattr(strategy, "chunk_k", 1)),
                                offload_state=bool(getattr(strategy, "offload_state", False)),
                                context=strategy.precision_plugin.train_step_context)
        self.results.append(result)
        pl_module.log_dict({"probe/grad_rel_diff": result.rel_diff, "probe/seq_len": float(result.length),
                            "probe/pieces": float(result.pieces)}, batch_size=1)
        tol = self._tolerance(trainer)
        if result.rel_diff > tol:
            msg = (f"exactness probe at step {trainer.global_step}: sequence {result.seq} ({result.length} tokens in "
                   f"{result.pieces} chunks) has a chunked gradient {result.rel_diff:.3e} (relative L2) away from "
                   f"its unchunked gradient, above the tolerance {tol:.1e} (callbacks.exactness.tolerance); max "
                   f"abs difference {result.max_abs_diff:.3e}. The chunked path is not exact: the state gradient, "
                   f"the prefix attention or the loss split is wrong.")
            if self.on_fail == "raise":
                raise ExactnessError(msg)
            log.error("%s", msg)
