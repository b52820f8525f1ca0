"""Offloaded state off the compute stream: prefixes prefetched to the device, their gradients sent back.

With ``chunk.offload_state`` on CUDA the state store lives in pinned host memory (``state.py``). For one
chunk, a ``PrefixMover`` holds every layer's host prefix views and hands attention a device copy of the
layer it is computing, while the copy of the layer it computes next is already under way on a side
stream::

    forward  (layers 0 .. n-1)     fetch(l): wait for layer l's copy; start layer l+1's
    backward (layers n-1 .. 0)     fetch(l): wait for layer l's copy; start layer l-1's
      layer checkpointing:         layer l's recompute fetches instead (and starts l-1's); l's backward reuses it

    compute stream   | attn l | o, mlp l | q,k,v l+1 | attn l+1 | ...
    h2d stream       | prefix l+1 |                 | prefix l+2 | ...     (each waits for what compute
                                                                             had queued when it started)

so no host copy waits on the compute stream, and the device holds at most two layers' prefixes (the
one in use, the next). Prefix gradients go the other way through ``CopyEngine.to_host``: device ->
pinned host on a second side stream, then added into the store's accumulators by one worker thread
in the order they were produced (the same sums in the same order: the same bits as a synchronous
copy), while the device goes on with the backward. The store drains those adds before it reads an
accumulator (``StateStore.grad``, ``free``).

Ordering facts this relies on: host prefix rows are written once (device -> host, queued on the compute
stream by an earlier chunk's forward) and never modified, so a copy that waits for the compute stream's
queue at its start reads final data. Device memory is only ever allocated and freed by the compute
stream (copy targets are made there before the copy is queued; a gradient being copied out is held
until its copy landed), so the caching allocator reuses it in compute-stream order, without
``record_stream``'s deferred frees, which let reserved memory grow while the CPU runs ahead of the GPU.

``CudaCopyEngine`` is the engine on CUDA; on CPU there is nothing to move (the store is already where
attention runs), and the test suite drives this module through a CPU stand-in engine that enforces the
same contract (``tests/copy_standin.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch


class Pending(Protocol):
    def wait(self) -> tuple[torch.Tensor, ...]:
        """The copies, usable on the caller's current stream (called where they are used)."""

    def release(self) -> None:
        """Give up a copy that was never waited for (its memory may be reused only after the copy)."""


class CopyEngine(Protocol):
    def to_device(self, host: Sequence[torch.Tensor]) -> Pending:
        """Start copying ``host`` tensors to the compute device off the compute stream."""

    def to_host(self, dev: torch.Tensor, then: Callable[[torch.Tensor], None]) -> None:
        """Copy ``dev`` to pinned host memory off the compute stream; call ``then(host)`` once it has landed
        (on a worker, in submission order)."""

    def drain(self) -> None:
        """Return once every ``then`` submitted so far has run (re-raising its error, if any)."""


class _CudaPending:
    def __init__(self, tensors: tuple[torch.Tensor, ...], done: torch.cuda.Event, device: torch.device) -> None:
        self.tensors, self.done, self.device = tensors, done, device

    def wait(self) -> tuple[torch.Tensor, ...]:
        torch.cuda.current_stream(self.device).wait_event(self.done)
        return self.tensors

    def release(self) -> None:
        # A copy nobody used: the compute stream owns its memory and may reuse it once freed, so it waits
        # for the copy first (an event wait on the device; the CPU does not block).
        torch.cuda.current_stream(self.device).wait_event(self.done)


def _land(done: torch.cuda.Event, then: Callable[[torch.Tensor], None], host: torch.Tensor,
          dev: torch.Tensor) -> None:
    done.synchronize()
    then(host)
    del dev  # the device gradient is released only after its copy has landed (see ``to_host``)


class CudaCopyEngine:
    """One h2d and one d2h side stream on ``device``, and one worker thread for the host-side adds.

    Device memory stays with the compute stream: copy targets are allocated there before the copy is
    queued on a side stream (no ``record_stream``, whose deferred frees let reserved memory grow while the
    CPU runs ahead of the GPU), and a gradient being copied out is kept alive by its pending add, which
    drops it after the copy landed. At most ``max_in_flight`` gradient copies are pending: beyond that the
    caller waits for the oldest, which bounds both the device gradients held and the pinned staging.
    """

    def __init__(self, device: torch.device, max_in_flight: int = 8) -> None:
        self.device = torch.device(device)
        self.h2d = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)
        # The worker only synchronizes events and adds on the host; setting its device keeps it from
        # creating a context on GPU 0 in a process that uses another one.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunkflow-offload",
                                          initializer=torch.cuda.set_device, initargs=(self.device,))
        self._pending: deque[Future] = deque()
        self.max_in_flight = max_in_flight

    def to_device(self, host: Sequence[torch.Tensor]) -> _CudaPending:
        compute = torch.cuda.current_stream(self.device)
        dev = tuple(torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in host)  # on compute
        self.h2d.wait_stream(compute)  # host rows written by device->host copies queued there; dev's memory
        with torch.cuda.stream(self.h2d):
            for d, t in zip(dev, host):
                d.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.h2d)
        return _CudaPending(dev, done, self.device)

    def to_host(self, dev: torch.Tensor, then: Callable[[torch.Tensor], None]) -> None:
        while len(self._pending) >= self.max_in_flight:
            self._pending.popleft().result()
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # dev is written by kernels queued there
        host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
        with torch.cuda.stream(self.d2h):
            host.copy_(dev, non_blocking=True)
            done = torch.cuda.Event(blocking=True)  # the worker sleeps in synchronize() instead of spinning
            done.record(self.d2h)
        self._pending.append(self._worker.submit(_land, done, then, host, dev))

    def drain(self) -> None:
        pending, self._pending = self._pending, deque()
        errors = [f.exception() for f in pending]  # wait for all before raising any
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first


_ENGINES: dict[torch.device, CudaCopyEngine] = {}


def copy_engine_for(device: torch.device, offload: bool) -> CudaCopyEngine | None:
    """The engine an offloaded store uses on ``device`` (one per device, shared by the steps: its streams and
    worker live as long as the process); None where the state already lives beside compute."""
    device = torch.device(device)
    if not offload or device.type != "cuda":
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _ENGINES:
        _ENGINES[device] = CudaCopyEngine(device)
    return _ENGINES[device]


class PrefixMover:
    """Serves one chunk's host prefixes to attention, one layer ahead (see module docstring).

    ``layers[i]`` = ``(ks, vs)``: layer ``i``'s prefix views, one per prefixed segment, as attention gets
    them. ``on_grad(i, j, g)``: the gradient ``g`` (on the device) of the ``j``-th tensor of layer ``i``
    in the order ``(*ks, *vs)``.
    """

    def __init__(self, layers: Sequence[tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]], engine: CopyEngine,
                 on_grad: Callable[[int, int, torch.Tensor], None]) -> None:
        self.layers = [(*ks, *vs) for ks, vs in layers]
        self.engine = engine
        self.on_grad = on_grad
        # A layer is recognised by its first view (each layer's buffers are its own): the forward passes
        # these very views to attention.
        self._index = {_key(t[0]): i for i, t in enumerate(self.layers)}
        # Copies started ahead, by layer. Every pass that autograd keeps (a kept forward, a backward) reaches
        # all layers, so nothing is left here while the chunk waits for its next pass; a dropped ``kv_only``
        # forward stops before its last layer's attention and leaves that copy to ``close``.
        self._ahead: dict[int, Pending] = {}
        # After the forward pass (``close``), a forward fetch is a layer recomputed inside backward (per-layer
        # activation checkpointing): its copy is kept here for that layer's attention backward, which follows.
        self._forward_done = False
        self._recomputed: dict[int, tuple[torch.Tensor, ...]] = {}

    def layer_of(self, host: Sequence[torch.Tensor]) -> int:
        """The layer whose prefix views ``host`` are (attention asks once per forward and keeps the answer
        for the backward, so the views need not be saved for backward nor survive saved-tensor hooks)."""
        i = self._index.get(_key(host[0]))
        if i is None or len(host) != len(self.layers[i]):
            raise RuntimeError("attention asked the prefix mover for a prefix of another chunk")
        return i

    def fetch(self, i: int, backward: bool) -> tuple[torch.Tensor, ...]:
        """Device copies of layer ``i``'s prefix views; starts copying the layer needed next.

        A recompute of layer ``i`` in backward (a forward fetch after ``close``: per-layer activation
        checkpointing) is where that layer's backward pass begins: it takes the copy, starts layer ``i - 1``'s
        and keeps its own for layer ``i``'s attention backward, which follows."""
        if backward and i in self._recomputed:
            return self._recomputed.pop(i)
        recompute = self._forward_done and not backward
        if recompute and i in self._recomputed:
            return self._recomputed[i]
        pending = self._ahead.pop(i, None)
        if pending is None:
            pending = self.engine.to_device(self.layers[i])
        nxt = i - 1 if backward or recompute else i + 1
        if 0 <= nxt < len(self.layers) and nxt not in self._ahead:
            self._ahead[nxt] = self.engine.to_device(self.layers[nxt])
        copies = pending.wait()
        if recompute:
            self._recomputed[i] = copies
        return copies

    def send_grads(self, i: int, grads: Sequence[torch.Tensor]) -> None:
        """Layer ``i``'s prefix gradients (device tensors, in the order ``(*ks, *vs)``) to the store."""
        for j, g in enumerate(grads):
            self.on_grad(i, j, g)

    def close(self) -> None:
        """End the forward pass (the executor calls it after the chunk's forward): release copies started for a
        layer it did not reach."""
        for pending in self._ahead.values():
            pending.release()
        self._ahead.clear()
        self._forward_done = True


def _key(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return t.data_ptr(), tuple(t.shape)
