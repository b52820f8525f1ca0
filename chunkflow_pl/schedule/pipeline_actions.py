"""Actions of a step plan: one ordered list per pipeline stage, compute plus point-to-point messages.

Compute actions are ``Action``: ``FORWARD(c, keep)``, ``RECOMPUTE(c)``, ``BACKWARD(c)``, each on the
stage's own layers (one stage: the whole model, paper Algorithm 2 on one device). Messages are
``Comm``: the hidden state ``[T, D]`` of a chunk goes forward from stage ``s`` to ``s + 1``, its
gradient ``[T, D]`` backward from ``s + 1`` to ``s``. ``T`` (``Comm.tokens``) is the chunk's token
count, which every rank derives from the same batch, and ``D`` is the model's hidden size: no shape
is ever exchanged.

Channels: one per stage pair and direction, so four kinds of message end on two channels::

    stage s                               stage s+1
    SEND_ACT(c, peer=s+1, T)   ---act s->s+1--->   RECV_ACT(c, peer=s, T)
    RECV_GRAD(c, peer=s+1, T)  <--grad s+1->s---   SEND_GRAD(c, peer=s, T)

The k-th send and the k-th receive of a channel carry the same message (FIFO, as NCCL matches them
per process group). Text form, used in docstrings and tests: ``>A3`` send activation of chunk 3,
``<A3`` receive it, ``>G3`` send gradient, ``<G3`` receive it (peer and size implied by the stage and
the chunk); compute actions print as ``F3``, ``F3(drop)``, ``R3``, ``B3``, and with split backward
(``parallel.split_backward``) ``B3(in)`` and ``W3``.

Split backward (zero-bubble schedules, Qi et al. 2023): ``BACKWARD(c, split=True)`` computes what the
critical path needs, the gradient of the stage input (sent by ``>G c``) and of the chunk's key/value
prefix state (into the state store), but no parameter gradient; ``WEIGHT(c)``, later on the same
stage and before the step ends, adds chunk ``c``'s parameter gradients. A chunk holds its activation
slot (``PipelinePlan.caps``) from its kept forward or recompute until its ``WEIGHT``: what the weight
gradient reads stays alive until then. ``WEIGHT`` sends and receives nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple


class Op(str, Enum):
    FORWARD = "forward"  # run the chunk forward; store its keys/values in the state store
    RECOMPUTE = "recompute"  # re-run a forward whose activations were dropped, right before its backward
    BACKWARD = "backward"  # backward of the chunk's loss plus the gradient of its keys/values
    WEIGHT = "weight"  # the parameter-gradient half of a split backward (``Action.split``), after its BACKWARD


@dataclass(frozen=True)
class Action:
    """One compute action of a stage on chunk ``chunk``."""

    op: Op
    chunk: int
    keep: bool = True  # FORWARD only: keep activations for backward (False: recompute later)
    split: bool = False  # BACKWARD only: input and state gradients only; a WEIGHT action adds the rest

    def __post_init__(self) -> None:
        if self.split and self.op is not Op.BACKWARD:
            raise ValueError(f"split=True on a {self.op.value} action: only a backward splits")

    def __str__(self) -> str:
        if self.op is Op.FORWARD and not self.keep:
            suffix = "(drop)"
        elif self.op is Op.BACKWARD and self.split:
            suffix = "(in)"
        else:
            suffix = ""
        return f"{self.op.value[0].upper()}{self.chunk}{suffix}"


class CommOp(str, Enum):
    SEND_ACT = "send_act"  # post this stage's output hidden state of the chunk to stage s+1 (async)
    RECV_ACT = "recv_act"  # block until the chunk's hidden state from stage s-1 is here: the forward input
    SEND_GRAD = "send_grad"  # post the gradient of this stage's input to stage s-1 (async)
    RECV_GRAD = "recv_grad"  # block until the gradient of this stage's output arrives from stage s+1


_SHORT = {CommOp.SEND_ACT: ">A", CommOp.RECV_ACT: "<A", CommOp.SEND_GRAD: ">G", CommOp.RECV_GRAD: "<G"}


@dataclass(frozen=True)
class Comm:
    """One message end: ``tokens`` rows of width ``D`` (the hidden size), between this stage and ``peer``."""

    op: CommOp
    chunk: int
    peer: int
    tokens: int

    @property
    def is_send(self) -> bool:
        return self.op in (CommOp.SEND_ACT, CommOp.SEND_GRAD)

    @property
    def kind(self) -> str:
        return "act" if self.op in (CommOp.SEND_ACT, CommOp.RECV_ACT) else "grad"

    def channel(self, stage: int) -> Channel:
        """The channel this action uses when it sits on ``stage``'s list."""
        src, dst = (stage, self.peer) if self.is_send else (self.peer, stage)
        return Channel(self.kind, src, dst)

    def __str__(self) -> str:
        return f"{_SHORT[self.op]}{self.chunk}"


class Channel(NamedTuple):
    """One point-to-point stream: ``kind`` ('act' or 'grad') from stage ``src`` to stage ``dst``."""

    kind: str
    src: int
    dst: int

    def __str__(self) -> str:
        return f"{self.kind} {self.src}->{self.dst}"


PipeAction = Action | Comm


def is_compute(a: PipeAction) -> bool:
    return isinstance(a, Action)


@dataclass(frozen=True)
class PipelinePlan:
    """Per-stage action lists of one step for one pipeline replica (one data-parallel rank's chunks).

    ``stages[s]``: the ordered actions of stage ``s``. ``caps[s]``: the most chunks whose activations
    stage ``s`` may hold at once (kept forwards and recomputes until their backward).
    ``chunk_tokens[c]``: tokens of chunk ``c`` (the ``T`` of its messages); chunks with 0 tokens
    (data-parallel padding) appear in no list.
    """

    stages: tuple[tuple[PipeAction, ...], ...]
    caps: tuple[int, ...]
    chunk_tokens: tuple[int, ...]
    # Virtual stages (``parallel.virtual_stages``, interleaved 1F1B): ``stages`` and ``caps`` are per *block*,
    # ``ranks x virtual`` of them, block ``b`` (``split_stages(num_layers, len(stages))[b]``) on rank
    # ``b % ranks``; every per-stage rule holds per block, and a ``Comm.peer`` names a block (each block pair
    # and direction is its own channel, a 2-rank process group at run time). ``order[r]``: rank ``r``'s
    # execution order, ``(block, index into stages[block])`` pairs, each block's list in its own order.
    # ``virtual == 1``: ``order`` is None and rank ``r`` runs ``stages[r]``.
    virtual: int = 1
    order: tuple[tuple[tuple[int, int], ...], ...] | None = None

    @property
    def pp(self) -> int:
        """Blocks (stages of layers): ``ranks * virtual``."""
        return len(self.stages)

    @property
    def ranks(self) -> int:
        return len(self.stages) // self.virtual

    def rank_actions(self, rank: int) -> list[tuple[int, PipeAction]]:
        """``(block, action)`` in the order rank ``rank`` executes them."""
        if self.order is None:
            return [(rank, a) for a in self.stages[rank]]
        return [(b, self.stages[b][i]) for b, i in self.order[rank]]

    def compute(self, stage: int) -> list[Action]:
        """Compute actions of ``stage`` in order (what the stage's executor runs between messages)."""
        return [a for a in self.stages[stage] if isinstance(a, Action)]

    def text(self) -> str:
        """One line per stage, e.g. ``stage 1: <A0 F0 B0 >G0``."""
        return "\n".join(f"stage {s}: " + " ".join(map(str, acts)) for s, acts in enumerate(self.stages))

    def fingerprint(self) -> str:
        """Short hash of everything a rank acts on; ranks compare it to catch diverging plans."""
        detail = [repr(self.caps), repr(self.chunk_tokens)]
        if self.virtual != 1:
            detail.append(f"virtual={self.virtual} order={self.order!r}")
        for acts in self.stages:
            detail.append(" ".join(_detail(a) for a in acts))
        return hashlib.sha256("\n".join(detail).encode()).hexdigest()[:16]


def _detail(a: PipeAction) -> str:
    if isinstance(a, Comm):
        return f"{a}@{a.peer}:{a.tokens}"
    return str(a)


def stage_text(actions: Sequence[PipeAction]) -> str:
    return " ".join(map(str, actions))

