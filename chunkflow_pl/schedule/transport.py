"""How a stage executor exchanges the residual stream with its neighbours: the transport it is given.

Only two things ever cross a stage boundary (DESIGN.md "Parallel runtime"): a chunk's hidden state
``h_TD`` [T, D] going forward (``"act"``) and its gradient going backward (``"grad"``). The K/V state and
its gradient stay on their stage. Every rank derives every message's shape from the same step batch
(``T`` = tokens of the chunk, ``D`` = hidden size), so nothing but the payload goes on the wire.

- ``LocalTransport``: in-process mailboxes: the transport of a one-stage plan (pp = 1, which sends
  nothing) and of two stages run one after the other in one process (tests).
- ``chunkflow_pl.strategy.p2p.P2PTransport``: torch.distributed point-to-point between ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

ACT = "act"  # hidden state, stage s -> s + 1
GRAD = "grad"  # its gradient, stage s + 1 -> s


class Transport(Protocol):
    def begin_step(self, step: int, stages: Sequence[Sequence[Any]], hidden_size: int, dtype: torch.dtype) -> None:
        """Take the replica's action lists of step ``step`` (``PipelinePlan.stages``) before the stage runs;
        a transport that posts receives ahead (``P2PTransport``) learns every message of the step here."""

    def send(self, kind: str, chunk: int, tensor: torch.Tensor) -> None:
        """Post ``tensor`` (``kind`` of ``chunk``) to the neighbour; may return before it is received."""

    def recv(self, kind: str, chunk: int, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        """Block until ``kind`` of ``chunk`` arrives from the neighbour; return it."""

    def flush(self) -> None:
        """Wait until every posted send has completed (end of step)."""


class LocalTransport:
    """Mailboxes keyed by (kind, chunk): a send is a put, a receive a take that must find its message."""

    def __init__(self) -> None:
        self._box: dict[tuple[str, int], torch.Tensor] = {}

    def begin_step(self, step: int, stages: Sequence[Sequence[Any]], hidden_size: int, dtype: torch.dtype) -> None:
        if self._box:
            raise RuntimeError(f"step {step} began with messages of the previous step never received: "
                               f"{sorted(self._box)}")

    def send(self, kind: str, chunk: int, tensor: torch.Tensor) -> None:
        key = (kind, chunk)
        if key in self._box:
            raise RuntimeError(f"second {kind} message for chunk {chunk} before the first was received")
        self._box[key] = tensor.detach()

    def recv(self, kind: str, chunk: int, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        t = self._box.pop((kind, chunk), None)
        if t is None:
            raise RuntimeError(f"receive of {kind} for chunk {chunk} with no message sent: the order is wrong")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise RuntimeError(f"{kind} of chunk {chunk}: got {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        return t.to(device)

    def flush(self) -> None:
        if self._box:
            raise RuntimeError(f"messages never received: {sorted(self._box)}")
