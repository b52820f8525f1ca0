"""A Lightning callback for ``benchmarks/sharding.py``: what one rank holds and where its step's time goes.

Model state = the parameters, gradients and optimizer state this rank *holds*, counted from the tensors
themselves (a DTensor counts its local shard only, ``to_local()``), never from a formula. It is taken just
before each optimizer step, the one point where all three exist (gradients are reduced and, under FSDP2,
resharded by then), and kept at its maximum.

Collective time: under FSDP2 the strategy's ``ShardedStage`` issues every data-parallel collective from two
methods, ``begin_step`` (all-gather of every unit) and ``_reduce`` (reduce-scatter / all-reduce of every
unit). Wrapping them with a clock splits each step into collective seconds and the rest (chunk compute,
planning, optimizer), which is what explains a tokens/s gap between layouts. Gloo collectives are
synchronous on CPU, so the wall time around the call is the collective's (including the wait for the slower
rank). Each call's duration is kept: the same call's minimum over the ranks is the collective itself (the rank
that arrives last waits for nobody), the spread is how long the other rank waited for it.

Written with the peak RSS (``VmHWM``) to ``<run dir>/state_rank<R>.json`` at the end of training.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import lightning as L
import torch


def _local_bytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class StateMeter(L.Callback):
    """``gloo_reduce_scatter``: put FSDP2's default comm (gloo's own ``reduce_scatter``) back in place of the
    strategy's all-reduce-based one (``strategy/gloo_comm.py``), so one benchmark run measures both."""

    def __init__(self, gloo_reduce_scatter: bool = False) -> None:
        self.gloo_reduce_scatter = gloo_reduce_scatter
        self.peak = {"params": 0, "grads": 0, "optimizer": 0, "total": 0}
        self.steps: list[dict] = []  # per step: all-gather and reduce call durations, optimizer step s
        self._now: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        sharded = getattr(trainer.strategy, "_sharded", None)  # None in 1 process: no collective to time
        if sharded is not None and self.gloo_reduce_scatter:
            from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

            for u in sharded.units:
                u.set_custom_reduce_scatter(DefaultReduceScatter())
        if sharded is not None:
            sharded.begin_step = self._timed(sharded.begin_step, "gather_s")
            sharded._reduce = self._timed(sharded._reduce, "reduce_s")

    def _timed(self, fn, key: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._now.setdefault(key, []).append(time.perf_counter() - t0)
        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._now = {"gather_s": [], "reduce_s": []}  # one duration per call, in call order (equal on all ranks)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.model.parameters())
        now = {"params": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p.grad) for p in params),
               "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))}
        now["total"] = now["params"] + now["grads"] + now["optimizer"]
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
        self._t_opt = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # optimizer step + scheduler + logging after it: from the pre-step hook to the batch's end
        self._now["optimizer_s"] = time.perf_counter() - getattr(self, "_t_opt", time.perf_counter())
        self.steps.append(dict(self._now))

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir) / f"state_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({**self.peak, "peak_rss": _peak_rss(), "steps": self.steps}))
