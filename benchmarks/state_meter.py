"""A Lightning callback for ``benchmarks/sharding.py``: this rank's model-state bytes and peak RSS, measured.

Model state = the parameters, gradients and optimizer state this rank *holds*, counted from the tensors
themselves (a DTensor counts its local shard only), taken just before each optimizer step (gradients are
reduced and, under FSDP2, resharded by then) and kept at their maximum. Written with the peak RSS
(``VmHWM``) to ``<run dir>/state_rank<R>.json`` at the end of training.
"""

from __future__ import annotations

import json
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
    def __init__(self) -> None:
        self.peak = {"params": 0, "grads": 0, "optimizer": 0, "total": 0}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(pl_module.model.parameters())
        now = {"params": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p.grad) for p in params),
               "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor))}
        now["total"] = now["params"] + now["grads"] + now["optimizer"]
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(trainer.default_root_dir) / f"state_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({**self.peak, "peak_rss": _peak_rss()}))
