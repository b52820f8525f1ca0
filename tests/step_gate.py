"""A callback that holds every rank at the end of one step until the test lets it go (importable by train.py's
Hydra ``+callbacks.gate._target_=step_gate.StepGate`` when tests/ is on PYTHONPATH).

It makes a multi-rank signal test independent of the machine's speed: the test signals a rank while all ranks
stand at a known point (after step ``step``'s optimizer step, before its checkpoint), then opens the gate.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class StepGate(L.Callback):
    def __init__(self, folder: str, step: int, timeout_s: float = 240.0) -> None:
        self.folder, self.step, self.timeout_s = Path(folder), int(step), float(timeout_s)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.timeout_s
        while not (self.folder / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.folder / 'open'} did not appear within {self.timeout_s:.0f} s")
            time.sleep(0.05)


def wait_at_gate(folder: Path, ranks: int, proc, timeout_s: float = 240.0) -> None:
    """Until every rank stands at the gate (``proc``: the launcher, which must not have ended)."""
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"rank{r}").exists() for r in range(ranks)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"the ranks did not reach the gate in {folder} within {timeout_s:.0f} s"
        time.sleep(0.05)


def open_gate(folder: Path) -> None:
    (folder / "open").touch()
