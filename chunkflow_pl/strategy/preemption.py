"""SIGTERM / SIGUSR1: stop at the next chunk boundary, save a resumable checkpoint, exit non-zero.

Schedulers announce the end of a job with a signal (SLURM: SIGTERM on pre-emption or cancel, and
``#SBATCH --signal=USR1@90`` before the time limit; torchrun forwards SIGTERM). A step on a long
sequence can run for minutes, so waiting for the step to end may outlast the grace period. Instead::

    signal arrives          -> the handler only sets a flag (nothing else is safe inside a handler)
    between chunk actions   -> the executor sees the flag and raises StepInterrupted: the step is
                               abandoned, its partial gradients dropped; weights, optimizer and lr
                               schedule are still those after the last completed step
    between steps           -> the next on_train_batch_start raises StepInterrupted
    on_exception            -> the data position and Lightning's loop state are set back to those at
                               the end of the last completed step (what last.ckpt holds), so a resumed
                               run redoes the interrupted global batch and logs the uninterrupted run's
                               step numbers; the checkpoint goes to <output_dir>/hpc_ckpt_<N>.ckpt
                               (Lightning's name for it)
    SIGUSR1 in a SLURM job  -> ``scontrol requeue <job id>`` (as Lightning's own SLURM handler does)
    train.py                -> exit code 128 + signal number (143 for SIGTERM, 138 for SIGUSR1)

The resumed run (``ckpt_path=<output_dir>/hpc_ckpt_<N>.ckpt``, or automatically when it starts in the
same output folder: a SLURM requeue, a torchrun restart) reproduces the uninterrupted run bit for bit.
These handlers replace Lightning's for the duration of training (Lightning's SIGTERM handler ends
the run after the current step with exit code 0; its SIGUSR1 handler saves in the middle of a step).

Several ranks: a signal reaches the ranks at different moments, and a rank that abandons a step while
another goes on into the step's collectives would hang both. So with more than one process the step is
not abandoned midway: at every step start the ranks take the maximum of their signal numbers (one
scalar all-reduce) and all stop together before the step; the checkpoint is then written by all. Two
rules keep every rank on the same collectives:

- the decision is the all-reduced value alone. A signal that lands while the all-reduce waits for a
  slower peer runs its handler as soon as the call returns; had the rank then looked at its own flag it
  would stop alone while its peers went into the step (gloo: "Received data size doesn't match expected
  size", SIGABRT, no checkpoint). Such a signal counts at the next step start.
- Lightning's own SIGTERM handler is never installed: it broadcasts from inside the handler, a
  collective that only the signalled rank issues. These handlers go in at ``setup`` (before Lightning
  would register its own) and stay until training ends.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed import ReduceOp

from chunkflow_pl.schedule.executor import StepInterrupted
from chunkflow_pl.utils.held_signals import release_signals, take_held_signal

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint (``checkpoint``)."""

    def __init__(self, signum: int, checkpoint: str | None, detail: str) -> None:
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}; resume with ckpt_path={checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"stopped on {name} ({detail}); {where}")
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def next_preemption_path(folder: str | Path) -> str:
    """``<folder>/hpc_ckpt_<N+1>.ckpt`` after the highest existing N (the names Lightning resumes from)."""
    nums = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt") if (m := re.search(r"_(\d+)\.ckpt$", p.name))]
    return str(Path(folder) / f"hpc_ckpt_{max(nums, default=0) + 1}.ckpt")


class Preemption(L.Callback):
    def __init__(self, requeue_on_sigusr1: bool = True) -> None:
        self.requeue_on_sigusr1 = requeue_on_sigusr1
        self.signum: int | None = None
        self.checkpoint: str | None = None
        self.detail = ""
        self._position: dict[str, Any] | None = None  # data position after the last completed step
        self._loops: dict[str, Any] | None = None  # Lightning's fit-loop state at the same moment
        self._saving = False  # inside _save: on_save_checkpoint substitutes self._loops
        self._previous: dict[int, Any] = {}
        self._before_step = False  # the stop was raised before the step began (not inside it)

    # ---- signals ---------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def stop_requested(self) -> bool:
        return self.signum is not None

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not save a checkpoint")
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        held = take_held_signal()  # one that came during start-up (utils/held_signals.py): stop before step 1
        if held is not None and self.signum is None:
            self.signum = held
            log.warning("%s received during start-up: stopping before the first step", signal.Signals(held).name)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}
        release_signals()  # held during start-up only: after training a signal acts as it did before the run

    # ---- Lightning hooks -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._install()
        # Trainer._run registers Lightning's handlers after this hook; keep it from replacing these (module docstring).
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "register_signal_handlers"):
            connector.register_signal_handlers = _keep_handlers
        else:  # a Lightning without that connector: its handler may run until on_train_start
            log.warning("Lightning's signal connector not found: a signal before training starts may not stop "
                        "every rank together")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._previous:  # setup did not install them (not fitting through Trainer.fit's setup)
            self._install()
        if trainer.world_size == 1:  # several ranks stop only between steps, together (module docstring)
            trainer.strategy.should_stop = self.stop_requested
        self._snapshot(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            # Decide on the agreed value only: a signal handled once the all-reduce returns waits a step.
            mine = torch.tensor(self.signum or 0, dtype=torch.int64, device=pl_module.device)
            agreed = int(trainer.strategy.reduce(mine, reduce_op=ReduceOp.MAX))
            if not agreed:
                return
            if self.signum is None:
                self.signum = agreed
        if self.stop_requested():
            self._before_step = True
            raise StepInterrupted(f"before step {trainer.global_step + 1}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._snapshot(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Saved from on_exception, the live loop state is mid-batch (batch counted ready, not completed).
        # Lightning restores such a state by adding one to the logger's step counter (_batches_that_stepped),
        # as it must for a checkpoint saved on_train_batch_end before that counter moves; here the counter
        # had already moved, so every logged step came out one too high. The state at the end of the
        # last completed step is one Lightning restores exactly (it is last.ckpt's).
        if self._saving and self._loops is not None:
            checkpoint["loops"]["fit_loop"] = copy.deepcopy(self._loops)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            if isinstance(exception, StepInterrupted) and self.signum is not None:
                inside = f"inside step {trainer.global_step + 1}, {exception}"  # the executor names the action
                self.detail = str(exception) if self._before_step else inside
                self._save(trainer, pl_module)
        finally:
            self._restore()

    def _snapshot(self, trainer: L.Trainer) -> None:
        """Data position and fit-loop state after the last completed step (or at the start): what _save writes."""
        dm = trainer.datamodule
        self._position = copy.deepcopy(dm.state_dict()) if dm is not None else None
        self._loops = copy.deepcopy(trainer.fit_loop.state_dict())

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for opt in trainer.optimizers:  # the abandoned step's partial gradients
            opt.zero_grad(set_to_none=True)
        if self._position is not None:  # redo the interrupted global batch on resume
            trainer.datamodule.load_state_dict(copy.deepcopy(self._position))
        path = next_preemption_path(trainer.default_root_dir)
        self._saving = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving = False
        self.checkpoint = path
        log.warning("%s: saved %s (step %d complete)", signal.Signals(self.signum).name, path, trainer.global_step)
        if self.signum == signal.SIGUSR1 and self.requeue_on_sigusr1 and trainer.is_global_zero:
            _requeue_slurm_job()


def _keep_handlers() -> None:
    """Stands in for Lightning's ``_SignalConnector.register_signal_handlers`` while ``Preemption`` owns the signals."""


def _requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (nothing outside SLURM)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("could not requeue SLURM job %s: %s", job, e)
        return
    if r.returncode == 0:
        log.warning("requeued SLURM job %s", job)
    else:
        log.error("scontrol requeue %s failed (%d): %s", job, r.returncode, r.stderr.strip())
