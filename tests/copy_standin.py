"""A CPU stand-in for ``schedule/offload.py``'s ``CudaCopyEngine``: the same contract, its breaches made visible.

On a GPU the engine's copies run on side streams and land "some time later"; what callers must respect:

- ``to_device(host)`` returns a ``Pending``; the copies may be read only after ``wait()`` (which makes
  the compute stream wait for the copy). Here the copies are NaN until ``wait()`` fills them, so a caller
  that reads them early computes NaN. The copy reads the host when it is queued: host rows that change
  after that fail an assertion. Inputs must be host tensors; each ``Pending`` ends exactly once, waited
  for or (never used) released.
- ``to_host(dev, then)``: ``then(host)`` runs on a worker once the copy has landed, and the copy reads
  ``dev`` whenever the side stream gets to it. Here both happen as late as allowed: at ``drain()``. A
  reader that does not drain first misses the gradient; a caller that changes ``dev`` after handing it
  over corrupts it.

``log`` records ``("issue" | "wait" | "release", layer_key)`` and ``("to_host", shape)`` in order; ``max_alive`` is
the most layer copies (``to_device`` calls with any copy still referenced) alive at once, taken at every
issue: copies are freed by reference counting, so anything that keeps a copy beyond its use (autograd,
a cache) shows up here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch


class _Pending:
    def __init__(self, engine: StandinCopyEngine, host: tuple[torch.Tensor, ...]) -> None:
        self.engine, self.host = engine, host
        self.landed = tuple(t.clone() for t in host)  # the copy reads the host when it is queued
        self.copies = tuple(torch.full_like(t, float("nan")) for t in host)
        self.done = False

    def wait(self) -> tuple[torch.Tensor, ...]:
        assert not self.done, "a copy was waited for twice, or after its release"
        self.done = True
        for c, h, first in zip(self.copies, self.host, self.landed):
            assert torch.equal(h, first), "the host rows changed after their copy was queued"
            c.copy_(first)
        self.engine.log.append(("wait", key(self.host[0])))
        return self.copies

    def release(self) -> None:
        assert not self.done, "a copy was released after it was waited for, or twice"
        self.done = True
        self.engine.log.append(("release", key(self.host[0])))


class StandinCopyEngine:
    def __init__(self) -> None:
        self.log: list[tuple[str, tuple]] = []
        self.max_alive = 0
        self._alive: list[tuple[weakref.ref, ...]] = []
        self._queue: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []

    def to_device(self, host: Sequence[torch.Tensor]) -> _Pending:
        host = tuple(host)
        assert host and all(t.device.type == "cpu" for t in host), "to_device copies host tensors"
        p = _Pending(self, host)
        self._alive = [refs for refs in self._alive if any(r() is not None for r in refs)]
        self._alive.append(tuple(weakref.ref(c) for c in p.copies))
        self.max_alive = max(self.max_alive, len(self._alive))
        self.log.append(("issue", key(host[0])))
        return p

    def to_host(self, dev: torch.Tensor, then: Callable[[torch.Tensor], None]) -> None:
        self.log.append(("to_host", tuple(dev.shape)))
        self._queue.append((dev, then))

    def drain(self) -> None:
        queue, self._queue = self._queue, []
        for dev, then in queue:
            then(dev.detach().clone())


def key(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return t.data_ptr(), tuple(t.shape)
