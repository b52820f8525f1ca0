"""The in-rank half of the fault campaign (``benchmarks/faults.py``): a Lightning callback that records when this
rank reaches the points a fault can be aimed at, and sends the trial's signal when the first rank reaches the
trial's point.

Loaded as ``+callbacks.fault._target_=fault_inject.FaultInjector +callbacks.fault.plan=<trial>/plan.json``; it does
not touch the computation (no random numbers, no tensors), so a run with it trains as one without it. Points::

    startup:tokenise   the data is read/tokenised (the memory check asks for the longest sequence)
    startup:pg         just before, or just after, the default process group is created
    step:inside        a random delay after step S starts (a timer thread: the signal lands mid-computation,
                       mid-collective or mid-message, wherever the main thread is)
    step:boundary      the K-th chunk-action boundary from step S on (between two executor actions)
    save:<part>        inside the periodic checkpoint save of step S: begin (nothing written), shards (every
                       shard written, no index), meta (index written, meta.pt not yet), commit (the staging
                       folder complete, not current), swap (last.ckpt moved aside, the new one not yet in its
                       place), end (saved, before the save's last barrier)

The first rank to reach the point (an O_EXCL file decides) sends the signal to the plan's target pids (written
by the driver as ``pids.json`` once every rank is started), itself last. Events go to ``events.r<rank>``
(``<monotonic time> <what> <step>``): the driver reads step times and completed saves from them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L


class FaultInjector(L.Callback):
    def __init__(self, plan: str) -> None:
        self.plan: dict[str, Any] = json.loads(Path(plan).read_text())
        self.folder = Path(plan).parent
        self.rank = int(os.environ.get("RANK", "0"))
        self.point: str = self.plan.get("point", "")  # "" = only record events (the reference run)
        self.step = int(self.plan.get("step", 0))
        self.saves = 0
        self.boundaries = 0
        self.current_step = 0
        self._patch()

    # ---- events and firing ---------------------------------------------------------------------
    def event(self, what: str, step: int | None = None) -> None:
        with open(self.folder / f"events.r{self.rank}", "a") as f:
            f.write(f"{time.monotonic():.6f} {what} {self.current_step if step is None else step}\n")

    def fire(self, point: str) -> None:
        if point != self.point:
            return
        try:
            os.close(os.open(self.folder / "fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another rank got there first: one signal per trial
        self.event(f"fire:{point}")
        pids = json.loads((self.folder / "pids.json").read_text())
        targets = [int(pids[str(r)]) for r in self.plan["targets"]]
        for pid in sorted(targets, key=lambda p: p == os.getpid()):  # this process last (SIGKILL ends it)
            try:
                os.kill(pid, int(self.plan["signal"]))
            except ProcessLookupError:
                pass

    # ---- patches (class attributes: in place before the Trainer exists) --------------------------
    def _patch(self) -> None:
        import torch
        import torch.distributed.checkpoint as dcp

        from chunkflow_pl.data import datamodule
        from chunkflow_pl.schedule import executor
        from chunkflow_pl.strategy import checkpoint, groups

        inj = self

        make_stores = datamodule.make_stores

        def make_stores_hooked(*a, **k):
            inj.fire("startup:tokenise")
            return make_stores(*a, **k)

        datamodule.make_stores = make_stores_hooked

        init = groups._init_dist_connection

        def init_hooked(*a, **k):
            inj.fire("startup:pg_before")
            out = init(*a, **k)
            inj.fire("startup:pg_after")
            return out

        groups._init_dist_connection = init_hooked

        ex_init = executor.ChunkExecutor.__init__

        def ex_init_hooked(self, *a, **k):
            ex_init(self, *a, **k)
            stop = self.should_stop

            def boundary() -> bool:
                if inj.current_step >= inj.step:
                    if inj.boundaries == int(inj.plan.get("boundary", 0)):
                        inj.fire("step:boundary")
                    inj.boundaries += 1
                return bool(stop()) if stop is not None else False

            self.should_stop = boundary

        executor.ChunkExecutor.__init__ = ex_init_hooked

        save = checkpoint.save_checkpoint

        def save_hooked(*a, **k):
            inj.saves += 1
            inj.fire(f"save:begin@{inj.saves}")
            save(*a, **k)
            inj.event("saved", int(a[0].get("global_step", -1)))  # the step the checkpoint holds

        checkpoint.save_checkpoint = save_hooked

        finish = dcp.FileSystemWriter.finish

        def finish_hooked(self, *a, **k):
            inj.fire(f"save:shards@{inj.saves}")
            return finish(self, *a, **k)

        dcp.FileSystemWriter.finish = finish_hooked

        torch_save = torch.save

        def torch_save_hooked(obj, f, *a, **k):
            if str(f).endswith("meta.pt.tmp"):
                inj.fire(f"save:meta@{inj.saves}")
            return torch_save(obj, f, *a, **k)

        torch.save = torch_save_hooked

        commit = checkpoint._commit

        def commit_hooked(path, partial):
            inj.fire(f"save:commit@{inj.saves}")
            commit(path, partial)
            inj.fire(f"save:end@{inj.saves}")

        checkpoint._commit = commit_hooked

        rename = Path.rename

        def rename_hooked(self, target):
            out = rename(self, target)
            if str(target).endswith(".old"):
                inj.fire(f"save:swap@{inj.saves}")
            return out

        Path.rename = rename_hooked

    # ---- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current_step = trainer.global_step + 1
        self.event("step_start")
        if self.point == "step:inside" and self.current_step == self.step:
            timer = threading.Timer(float(self.plan.get("delay", 0.0)), self.fire, ("step:inside",))
            timer.daemon = True
            timer.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.event("step_end")
