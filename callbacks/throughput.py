"""Logs tokens/s, tokens seen and chunk counts of each ChunkFlow step."""

from __future__ import annotations

import time

import lightning as L


class ChunkThroughput(L.Callback):
    def __init__(self) -> None:
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "last_stats", None)
        if stats is None or self._t0 is None:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        pl_module.log_dict(
            {
                "train/tokens_per_s": stats.global_tokens / dt,
                "train/tokens_seen": float(pl_module.tokens_seen),
                "train/step_time_s": dt,
                "train/peak_state_mib": stats.peak_state_bytes / 2**20,
            },
            batch_size=1,
        )
