"""SIGTERM / SIGUSR1 during start-up are held for the pre-emption callback, not obeyed at once.

The pre-emption callback (``strategy/preemption.py``) takes the signals when fit sets up. Before that (imports,
Hydra, building the model, reading and tokenising the data, creating the process group: seconds to minutes) a
signal took its default action: the process died with -SIGTERM, no checkpoint, and under several processes its
peers waited for it in the rendezvous or the first collective until the collective timeout (found by
``benchmarks/faults.py``). ``hold_signals()``, called first thing by ``train.py`` and by ``ChunkFlowStrategy``,
records such a signal instead; the callback takes it over (``take_held_signal``) and the run stops before its
first step like any pre-empted run: every rank agrees, a checkpoint is written, exit 128 + signal.

No torch here: train.py calls this before its heavy imports.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_held: int | None = None


def _record(signum: int, frame: Any) -> None:
    global _held
    if _held is None:
        _held = signum


def hold_signals() -> None:
    """Record SIGTERM/SIGUSR1 from now on, where nothing else handles them (a user's own handler stays)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the callback warns about this case
    for s in SIGNALS:
        if signal.getsignal(s) == signal.SIG_DFL:
            signal.signal(s, _record)


def release_signals() -> None:
    """Give SIGTERM/SIGUSR1 their default action back where they are held (training is over: nothing would act on
    a held one), forgetting any held."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        if signal.getsignal(s) is _record:
            signal.signal(s, signal.SIG_DFL)
    take_held_signal()


def take_held_signal() -> int | None:
    """The first signal recorded since the last call (None if none), forgotten once taken."""
    global _held
    held, _held = _held, None
    return held
