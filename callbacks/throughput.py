"""Tokens/s (shown in the progress bar), step time, model FLOPs, MFU and HFU of each ChunkFlow step.

Per step, logged to the active logger(s)::

    train/tokens_per_s      global tokens of the step / its wall time (data-parallel ranks summed)
    train/step_time_s       wall time from batch start to batch end (optimizer step included)
    perf/model_tflop        model FLOPs of this rank's chunks (forward + backward, ``schedule/step_flops.py``)
    perf/tflop_per_s        model FLOPs / step time
    perf/mfu                model FLOP/s / peak FLOP/s
    perf/hfu                (model + the recomputed chunks' first, kv-only forwards) FLOP/s / peak; one
                            device only (the recomputed chunks are those of the plan the strategy's
                            step runner just ran, ``strategy.last_run``)
    perf/peak_tflop_per_s   the peak used: ``peak_flops`` if set, else a matrix-product probe at fit start

FLOPs are per rank (its data-parallel share and, in a pipeline, its stage's layers), so MFU is the
rank's own; with balanced ranks it is also the job's.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

from chunkflow_pl.model.flops import ModelFlops
from chunkflow_pl.schedule.step_flops import step_flops
from chunkflow_pl.utils.peak_flops import matmul_dtype, measure_peak_flops

log = logging.getLogger(__name__)


class ChunkThroughput(L.Callback):
    """``peak_flops``: the device's peak FLOP/s in the training dtype (e.g. 989e12 for an H100 SXM in
    bf16, dense); ``None`` measures an achievable matmul peak at fit start (about 0.3 s).
    ``flops``: set False to log only tokens/s and step time."""

    def __init__(self, peak_flops: float | None = None, flops: bool = True) -> None:
        if peak_flops is not None and float(peak_flops) <= 0:
            raise ValueError(f"callbacks.throughput.peak_flops={peak_flops} must be positive (FLOP/s) or null")
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.flops = flops
        self._t0: float | None = None
        self._model_flops: ModelFlops | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.flops:
            return
        model = pl_module.model
        self._model_flops = ModelFlops.from_config(model.cfg, layers=len(model.layer_names),
                                                   head=model.stage.has_head)
        if self.peak_flops is None:
            device = trainer.strategy.root_device
            dtype = matmul_dtype(trainer.precision)
            self.peak_flops = measure_peak_flops(device, dtype)
            log.info("measured matmul peak on %s in %s: %.3g FLOP/s (set callbacks.throughput.peak_flops to use "
                     "the datasheet's)", device, dtype, self.peak_flops)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "last_stats", None)
        if stats is None or self._t0 is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {
            "train/tokens_per_s": stats.global_tokens / dt,
            "train/tokens_seen": float(pl_module.tokens_seen),
            "train/step_time_s": dt,
        }
        pl_module.log("train/tokens_per_s", out.pop("train/tokens_per_s"), prog_bar=True, batch_size=1)
        if self._model_flops is not None and self.peak_flops:
            fl = step_flops(self._model_flops, [c.segments for c in batch.chunks], self._recomputed(trainer))
            out.update({
                "perf/model_tflop": fl.model / 1e12,
                "perf/tflop_per_s": fl.model / dt / 1e12,
                "perf/mfu": fl.model / dt / self.peak_flops,
                "perf/peak_tflop_per_s": self.peak_flops / 1e12,
            })
            if self._single_device(trainer):
                out["perf/hfu"] = fl.hardware / dt / self.peak_flops
        pl_module.log_dict(out, batch_size=1)

    @staticmethod
    def _single_device(trainer) -> bool:
        dims = getattr(trainer.strategy, "dims", None)
        return dims is None or dims.pp == 1

    def _recomputed(self, trainer) -> list[int]:
        """Chunks the step just run recomputed on one device (from its plan, ``StepRun.recomputed``)."""
        run = getattr(trainer.strategy, "last_run", None)
        if run is None or not self._single_device(trainer):
            return []
        return run.recomputed
