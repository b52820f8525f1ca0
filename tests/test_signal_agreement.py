"""Several ranks stop on a signal together or not at all (chunkflow_pl/strategy/preemption.py, issue 19 item 1).

The race this pins: rank 1 gets SIGTERM while its step-start all-reduce waits for rank 0. Its handler runs
as soon as the collective returns, so a rank that looked at its own flag after the all-reduce stopped alone
while rank 0 went into the step: a gloo size mismatch, SIGABRT and no checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from multiproc import free_port, gloo_strategy, spawn_ranks

from chunkflow_pl.schedule.executor import StepInterrupted
from chunkflow_pl.strategy.preemption import Preemption


def _agreement_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from chunkflow_pl.strategy.dims import ParallelDims

    strategy = gloo_strategy(rank, port, ParallelDims(dp=2, pp=1, world_size=2, num_layers=1))
    callback = Preemption()
    callback._install()
    stopped = []
    try:
        for step in (1, 2):
            # the hooks read only these of the trainer and module
            trainer = types.SimpleNamespace(world_size=2, strategy=strategy, global_step=step - 1)
            if step == 1:
                if rank == 1:  # lands while rank 1 waits in the all-reduce for rank 0
                    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
                else:
                    time.sleep(2.0)
            try:
                callback.on_train_batch_start(trainer, types.SimpleNamespace(device=torch.device("cpu")), None, 0)
                stopped.append(None)
            except StepInterrupted as e:
                stopped.append(str(e))
    finally:
        callback._restore()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"stopped": stopped, "signum": callback.signum}))
    strategy.destroy_process_groups()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_a_signal_during_the_step_start_agreement_stops_every_rank_at_the_same_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_agreement_worker, (free_port(), str(tmp_path)), timeout=90,
                hang="a rank stopped alone and the other hung")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # step 1's agreement had already been taken when rank 1 handled the signal: both run step 1, both stop at 2
    assert r0["stopped"] == r1["stopped"] == [None, "before step 2"], (r0, r1)
    assert r0["signum"] == r1["signum"] == signal.SIGTERM


class _SeeHandler(L.Callback):
    """Records the SIGTERM handler in force when training starts (placed before ``Preemption``)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)


def test_lightning_never_installs_its_sigterm_handler_during_fit(tmp_path):
    """Lightning's handler broadcasts from inside the signal handler: on one rank only, a collective that no
    peer matches. ``Preemption`` takes the signals at setup, before Lightning would register its own."""
    see, preemption = _SeeHandler(), Preemption()
    before = signal.getsignal(signal.SIGTERM)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[see, preemption],
                        default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert see.handler == preemption._handler, see.handler
    assert signal.getsignal(signal.SIGTERM) == before  # handed back when training ends
