"""``P2PTransport``: a chunk's hidden state and its gradient between neighbouring pipeline stages.

Channels and groups
-------------------
One 2-rank process group per channel (stage pair x direction) per data-parallel replica, created
by every rank in one fixed order (``channel_order``)::

    replica d, pp = 3                                         creation order
    stage 0 --act 0->1--> stage 1 --act 1->2--> stage 2       for d in dp: for s in 0..pp-2:
    stage 0 <-grad 1->0-- stage 1 <-grad 2->1-- stage 2           (act, s -> s+1), (grad, s+1 -> s)

NCCL and gloo match point-to-point messages per process group in posting order, and a NCCL send
completes only with its receive: with one group per direction an activation waiting on its
channel never blocks a gradient on the other (``pipeline_checker`` proves the plan's lists finish
under exactly that model). Each group carries one tiny message right after creation, channel by
channel in the creation order (both ends of every channel meet it at the same place in that order,
so the warm-up cannot deadlock): NCCL communicators are created there, not inside a step.

Virtual stages (``parallel.virtual_stages=v``): channels are per *block* pair and direction, block ``b``
on rank ``b % pp``, so the same two ranks share several channels that never mix::

    pp = 2, v = 2          act 0->1, grad 1->0     rank 0 -> rank 1, rank 1 -> rank 0
    blocks 0 2 on rank 0   act 1->2, grad 2->1     rank 1 -> rank 0 (block 3's successor wraps: 1 -> 2)
    blocks 1 3 on rank 1   act 2->3, grad 3->2     rank 0 -> rank 1

``open_block_transports`` creates every group once (the same creation order and warm-up, over blocks) and
gives each of the rank's blocks its own ``P2PTransport``: a block's transport is a stage's transport with
the block in the stage's place (its receives, its release points, in ``PipelinePlan.stages[block]``).

Messages of a step
------------------
- ``send``: ``isend``; the tensor stays referenced until the send is known to be complete, which
  gloo never reports before ``wait`` (its send work's ``is_completed`` stays False, and ``wait``
  blocks until the peer posts the receive). So the plan says when: a send to the peer is complete
  once this rank has received a message the peer sent after its matching receive
  (``release_points``); the send is waited for (at once) and dropped right after that receive.
  Sends after which the peer sends nothing back (the step's tail: the last chain's backward wave)
  are held until ``flush`` waits for them at the end of the step: on each stage at most the input
  gradients of that wave, as many ``[T, D]`` buffers as the boundary checkpoints the stage kept for
  the same chain. (On NCCL, whose works report completion, finished sends are also dropped as
  they complete.)
- ``recv``: ``begin_step`` hands over the stage's action list; on each incoming channel the next
  receive of the plan is always posted (one ``[T, D]`` buffer per incoming channel), so the data
  moves while the stage computes (NCCL and gloo move data only once both ends are posted). ``recv``
  waits for it, checks it is the chunk asked for, and posts the channel's next receive.

Every size comes from the plan on both ends: only payloads go on the wire. With
``check_messages`` (debug) every payload follows a header ``(step, chunk, tokens, kind)``; the
receiver compares it with what its own plan expects before it posts the payload's receive (so
nothing is posted ahead then), and a mismatch raises naming both ranks and chunks instead of
hanging or reading a wrongly sized tensor.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from chunkflow_pl.schedule.pipeline_actions import Comm, PipeAction
from chunkflow_pl.schedule.transport import ACT, GRAD
from chunkflow_pl.strategy.dims import ParallelDims

log = logging.getLogger(__name__)

_KIND_CODE = {ACT: 0, GRAD: 1}
_KIND_NAME = {v: k for k, v in _KIND_CODE.items()}


class MessageMismatch(RuntimeError):
    """A received message is not the one this rank's plan expects (ranks diverged)."""


@dataclass(frozen=True)
class ChannelSpec:
    """``kind`` messages from stage ``src`` to stage ``dst`` of data-parallel replica ``dp_rank``."""

    kind: str
    src: int
    dst: int
    dp_rank: int


def release_points(stages: Sequence[Sequence[PipeAction]], stage: int) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """For each receive ``(kind, chunk)`` of ``stage``: its sends ``(kind, chunk)`` known received once it completes.

    With a neighbour ``n``, the k-th send to ``n`` is matched by ``n``'s k-th receive from us (FIFO), at
    position ``p`` of ``n``'s list. The first message ``n`` sends us from a position after ``p`` proves ``n``
    got ours: when our receive of it completes, our send is complete too. Sends with no such message
    are left to ``flush``.
    """
    out: dict[tuple[str, int], list[tuple[str, int]]] = {}
    mine = stages[stage]
    for n in (stage - 1, stage + 1):
        if not 0 <= n < len(stages):
            continue
        peer = stages[n]

        def ends(acts: Sequence[PipeAction], other: int, send: bool) -> list[tuple[int, Comm]]:
            return [(i, a) for i, a in enumerate(acts) if isinstance(a, Comm) and a.peer == other and a.is_send == send]

        sends, my_recvs = ends(mine, n, True), ends(mine, n, False)
        peer_recvs, peer_sends = ends(peer, stage, False), ends(peer, stage, True)
        m = 0
        for (_, a), (p, _) in zip(sends, peer_recvs):
            while m < len(peer_sends) and peer_sends[m][0] < p:
                m += 1
            if m < len(my_recvs):
                r = my_recvs[m][1]
                out.setdefault((r.kind, r.chunk), []).append((a.kind, a.chunk))
    return out


def channel_order(dims: ParallelDims, virtual: int = 1) -> list[ChannelSpec]:
    """Every channel of the run, in the order every rank creates (and warms up) their groups; ``src``/``dst`` are
    blocks (``pp x virtual`` of them, block ``b`` on pipeline rank ``b % pp``; stages when ``virtual`` is 1)."""
    out = []
    for d in range(dims.dp):
        for s in range(dims.pp * virtual - 1):
            out += [ChannelSpec(ACT, s, s + 1, d), ChannelSpec(GRAD, s + 1, s, d)]
    return out


@dataclass
class _BlockLinks:
    out: dict  # kind -> _Link this block sends that kind on
    inp: dict  # kind -> _Link it receives that kind on


def _open_channels(dims: ParallelDims, rank: int, device: torch.device, timeout: timedelta | None,
                   virtual: int) -> dict[int, _BlockLinks]:
    """Create every channel's group (collective, in ``channel_order``), warm up this rank's; its links per block."""
    links: dict[int, _BlockLinks] = {}
    mine: list[tuple[ChannelSpec, _Link, bool]] = []
    for ch in channel_order(dims, virtual):
        src, dst = dims.rank(ch.src % dims.pp, ch.dp_rank), dims.rank(ch.dst % dims.pp, ch.dp_rank)
        # every rank calls new_group for every channel, in order; timeout None: torch's default (30 min)
        group = dist.new_group([src, dst], timeout=timeout)
        if rank == src:
            link = _Link(group, dst, ch.dst)
            links.setdefault(ch.src, _BlockLinks({}, {})).out[ch.kind] = link
        elif rank == dst:
            link = _Link(group, src, ch.src)
            links.setdefault(ch.dst, _BlockLinks({}, {})).inp[ch.kind] = link
        else:
            continue
        mine.append((ch, link, rank == src))
    for _, link, is_src in mine:  # warm-up: one tiny message per channel, in the creation order
        t = torch.zeros(1, device=device)
        if is_src:
            dist.send(t, dst=link.peer, group=link.group)
        else:
            dist.recv(t, src=link.peer, group=link.group)
    return links


def open_block_transports(dims: ParallelDims, rank: int, device: torch.device, virtual: int,
                          check_messages: bool = False, timeout: timedelta | None = None) -> dict[int, P2PTransport]:
    """Virtual stages: one ``P2PTransport`` per block of ``rank`` (``rank % pp + j pp`` ...), over channels per block
    pair and direction. Collective: every rank of the run calls it (it creates every channel's group)."""
    if virtual < 2 or dims.pp < 2:
        raise ValueError(f"open_block_transports is for parallel.virtual_stages > 1 with parallel.pp > 1 "
                         f"(got virtual {virtual}, pp {dims.pp}); use P2PTransport")
    links = _open_channels(dims, rank, torch.device(device), timeout, virtual)
    stage = dims.coords(rank)[0]
    return {b: P2PTransport(dims, rank, device, check_messages, timeout, block=b,
                            links=links.get(b, _BlockLinks({}, {}))) for b in range(stage, dims.pp * virtual, dims.pp)}


@dataclass
class _Link:
    group: Any  # a 2-rank ProcessGroup
    peer: int  # global rank of the other end
    peer_stage: int


@dataclass
class _Posted:
    chunk: int
    tokens: int
    work: Any
    buf: torch.Tensor  # the payload, or the header with check_messages


class P2PTransport:
    """The ``Transport`` of one rank (one stage of one replica) over torch.distributed; see the module doc.

    Collective at construction: every rank of the run must build it (it creates every channel's group).
    ``device``: where payloads live (the stage's device; NCCL needs CUDA tensors).
    ``timeout``: of every channel's group (``parallel.collective_timeout``; None: torch's default).
    ``block``/``links``: made by ``open_block_transports`` only (virtual stages): the transport of one block,
    over links already made; ``stage`` is then that block.
    """

    def __init__(self, dims: ParallelDims, rank: int, device: torch.device, check_messages: bool = False,
                 timeout: timedelta | None = None, *, block: int | None = None,
                 links: _BlockLinks | None = None) -> None:
        self.dims = dims
        self.rank = rank
        self.stage, self.dp_rank = dims.coords(rank)
        self.num_stages = dims.pp
        self.device = torch.device(device)
        self.check_messages = check_messages
        if links is None:
            links = _open_channels(dims, rank, self.device, timeout, virtual=1).get(self.stage, _BlockLinks({}, {}))
        else:
            self.stage, self.num_stages = int(block), None  # a block of a virtual pipeline
        self._out: dict[str, _Link] = links.out  # kind -> the channel this stage sends that kind on
        self._in: dict[str, _Link] = links.inp
        self._step = 0
        self._expect: dict[str, deque[tuple[int, int]]] = {ACT: deque(), GRAD: deque()}
        self._posted: dict[str, _Posted | None] = {ACT: None, GRAD: None}
        self._sends: dict[tuple[str, int], list[tuple[Any, torch.Tensor]]] = {}  # (kind, chunk) -> (work, tensor)
        self._release: dict[tuple[str, int], list[tuple[str, int]]] = {}
        self._hidden = 0
        self._dtype = torch.float32

    def _where(self) -> str:
        what = "stage" if self.num_stages is not None else "block"
        return f"rank {self.rank} ({what} {self.stage}, dp rank {self.dp_rank}), step {self._step}"

    # ---- a step ------------------------------------------------------------------------------
    def begin_step(self, step: int, stages: Sequence[Sequence[PipeAction]], hidden_size: int,
                   dtype: torch.dtype) -> None:
        """Take the replica's action lists for this step (``PipelinePlan.stages``) and post the first receive
        of each incoming channel of this rank's stage."""
        if any(p is not None for p in self._posted.values()) or self._sends:
            raise RuntimeError(f"{self._where()}: a new step began while the previous one has messages in "
                               "flight (it did not end with flush)")
        self._step, self._hidden, self._dtype = int(step), int(hidden_size), dtype
        self._expect = {ACT: deque(), GRAD: deque()}
        self._release = release_points(stages, self.stage)
        for a in stages[self.stage]:
            if isinstance(a, Comm) and not a.is_send:
                self._expect[a.kind].append((a.chunk, a.tokens))
        for kind in (ACT, GRAD):
            self._post_next(kind)

    def _post_next(self, kind: str) -> None:
        if not self._expect[kind]:
            self._posted[kind] = None
            return
        link = self._link(self._in, kind, "receive")
        chunk, tokens = self._expect[kind].popleft()
        if self.check_messages:
            buf = torch.empty(4, dtype=torch.int64, device=self.device)
        else:
            buf = torch.empty((tokens, self._hidden), dtype=self._dtype, device=self.device)
        self._posted[kind] = _Posted(chunk, tokens, dist.irecv(buf, src=link.peer, group=link.group), buf)

    def _link(self, links: dict[str, _Link], kind: str, what: str) -> _Link:
        link = links.get(kind)
        if link is None:
            raise RuntimeError(f"{self._where()}: no channel to {what} {kind} messages on (stage {self.stage} of "
                               f"{self.num_stages or 'a virtual pipeline'}): the plan is wrong for this stage")
        return link

    def send(self, kind: str, chunk: int, tensor: torch.Tensor) -> None:
        link = self._link(self._out, kind, "send")
        t = tensor.detach().contiguous()
        works = self._sends.setdefault((kind, chunk), [])
        if self.check_messages:
            header = torch.tensor([self._step, chunk, t.shape[0], _KIND_CODE[kind]], dtype=torch.int64,
                                  device=t.device)
            works.append((dist.isend(header, dst=link.peer, group=link.group), header))
        works.append((dist.isend(t, dst=link.peer, group=link.group), t))
        # NCCL reports completion (gloo never does before wait): drop what has gone.
        self._sends = {key: ws for key, ws in self._sends.items() if not all(w.is_completed() for w, _ in ws)}

    def recv(self, kind: str, chunk: int, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        link = self._link(self._in, kind, "receive")
        posted = self._posted[kind]
        if posted is None or posted.chunk != chunk:
            expected = f"chunk {posted.chunk}" if posted is not None else "no more messages"
            raise RuntimeError(f"{self._where()}: receive of the {kind} of chunk {chunk}, but the plan given to "
                               f"begin_step expects {expected} next on this channel: the executor left its plan")
        posted.work.wait()
        if self.check_messages:
            self._check_header(posted, kind, link)
            buf = torch.empty((posted.tokens, self._hidden), dtype=self._dtype, device=self.device)
            dist.recv(buf, src=link.peer, group=link.group)
        else:
            buf = posted.buf
        for done in self._release.get((kind, chunk), ()):  # the peer got these before it sent this message
            for w, _ in self._sends.pop(done, ()):
                w.wait()
        self._post_next(kind)
        if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
            raise RuntimeError(f"{self._where()}: the {kind} of chunk {chunk} is {tuple(buf.shape)} {buf.dtype} by "
                               f"the plan, but the executor expects {tuple(shape)} {dtype}")
        return buf.to(device)

    def _check_header(self, posted: _Posted, kind: str, link: _Link) -> None:
        step, chunk, tokens, code = (int(x) for x in posted.buf.tolist())
        got_kind = _KIND_NAME.get(code, f"unknown kind {code}")
        if (step, chunk, tokens, got_kind) != (self._step, posted.chunk, posted.tokens, kind):
            peer = f"{'stage' if self.num_stages else 'block'} {link.peer_stage}"
            raise MessageMismatch(
                f"{self._where()}: expected the {kind} of chunk {posted.chunk} ({posted.tokens} tokens) of step "
                f"{self._step} from rank {link.peer} ({peer}), but rank {link.peer} sent the "
                f"{got_kind} of chunk {chunk} ({tokens} tokens) of step {step}: the two ranks' plans or "
                f"executors diverge")

    def flush(self) -> None:
        """Wait for every send of the step; fail if the plan's receives were not all taken."""
        for works in self._sends.values():
            for w, _ in works:
                w.wait()
        self._sends = {}
        left = {k: ([p.chunk] if p is not None else []) + [c for c, _ in self._expect[k]]
                for k, p in self._posted.items()}
        if any(left.values()):
            raise RuntimeError(f"{self._where()}: the step ended with receives of the plan never taken: "
                               + ", ".join(f"{k} of chunks {v}" for k, v in left.items() if v))
