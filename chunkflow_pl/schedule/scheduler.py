"""State-aware 1F1B over pipeline stages: per-stage action lists for one step (pure python).

Units and orders
----------------
A *unit* is a component of the chunk graph (``graph.py``): one standalone chunk, or chunks linked by
sequence continuation (a *chain*). A unit's chunks run forward in ``forward_order`` and backward in
exactly the reverse order, on every stage, and only the last ``k`` forwards keep activations; the
others run without autograd and are recomputed before their backward (paper Algorithm 2). Chunks
with 0 tokens (data-parallel padding) get no action at all. One device is the case ``pp = 1``: this
scheduler is the only one, and ``schedule/runner.py`` runs its plans for every layout.

Messages between two stages are matched in order (one FIFO per channel), so every stage runs the
forwards in one global *forward order* and the backwards in one global *backward order*; stages
differ only in how they interleave the two. Stage 0 fixes the forward order, unit by unit (a
unit's forwards stay contiguous). The last stage fixes the backward order: chains one after the
other in forward order, each reversed, and each standalone chunk's backward right after its
forward there, which may put it between two backwards of an earlier chain.

Interleaving: a deterministic event simulation over a cost model (list scheduling)
---------------------------------------------------------------------------------
A stage other than the last, whenever it is free, starts the first of

1. the next backward in order, if its gradient has arrived (recomputing it first if its forward
   dropped activations and it was not recomputed yet);
2. the next forward in order, if its input has arrived and it is *admitted*;
3. the recompute of its oldest chain's next dropped chunk, ahead of that chunk's gradient: the
   stage would idle otherwise, and the recompute leaves the backward wave's critical path;
4. with split backward, the oldest pending ``W`` (below).

The last stage runs a standalone chunk's backward right after its forward, and a chain's
backwards one per turn, alternating with a forward when one is ready (1F1B), so upstream stages get
work while the chain drains; then, with split backward, the oldest pending ``W``. With ``pp = 1``
it is plain backward-first, one unit after the other: each unit's forwards, then its backwards
(with the recomputes just in time), whatever the cost model (``tests/single_device_oracle.py``
writes that order directly; ``test_pipeline_plan.py`` holds the two equal).

Admission bounds live activations (kept forwards and recomputes until their backward, with split
backward until their ``W``) by ``caps[s]``, default ``max(pp - s, k)``: the 1F1B depth, but room
for a unit's ``k`` kept chunks. A kept forward needs a free slot, plus one spare while an earlier
unit on the stage still has a dropped chunk to recompute: that unit's recompute comes before the
newer chunk's backward frees anything, and once the unit's own kept chunks are gone only newer
chunks hold slots. (On the last stage a standalone chunk needs no spare: its backward follows at
once, and its pending ``W`` runs before any recompute that needs its slot.) Stage 0 takes units in
index order, but skips a chain while ``max_open_chains`` chains are open on it (forwarded, not yet
fully backwarded: their key/value state is alive) or while its first forward is not admitted;
standalone chunks then fill the gap the open chain's dependencies leave. Times are floats computed
the same way on every rank; ties break by stage index, so the same inputs always give the same plan.

Why no deadlock: the oldest unfinished unit always progresses. Its forwards come before any
later unit's, so only its own kept chunks hold slots when they are admitted (``k <= caps[s]``);
the backwards ahead of its own in the order are standalone chunks whose backward already ran on
the last stage, so they wait for nothing but gradients; its recomputes find the spare slot that
every later admission left. With split backward a ``W`` waits for nothing but its own ``B``, which
ran earlier on the same stage, so a slot held by a pending ``W`` is never stuck: the stage runs that
``W`` whenever nothing else can start, and the argument above holds once the pending ``W`` are done.

Split backward (``split_backward=True``; zero-bubble schedules, Qi et al. 2023)
-------------------------------------------------------------------------------
Every backward becomes ``B c(in)`` (``Action(Op.BACKWARD, c, split=True)``): the gradients of the
stage input (sent to stage s-1) and of the chunk's key/value prefix state (which the previous piece
of its sequence waits for), the critical path. Each chunk also gets one ``W c`` (``Op.WEIGHT``), its
parameter gradients, later on the same stage; nothing waits for it. ``B`` takes the backward's place
in every rule above. A pending ``W`` runs, oldest first, when the stage would otherwise idle (no rule
above can start), or earlier when the next backward is due but its recompute finds every slot taken:
only a ``W`` frees a slot then (a chunk holds its slot until its ``W``, so admission counts it).
Whatever is still pending when the stage has nothing else left runs at the end of its list. With
``pp = 1`` there is nothing to fill (one device never waits): each ``W`` follows its ``B`` at once, the
single-device order with every backward cut in two, and memory stays the unsplit plan's.
``CostModel`` prices ``B(in)`` and ``W`` from FLOPs (``cost.py``); an example follows the unsplit one
below.

Action-list contract (what the runtime executes)
------------------------------------------------
Stage ``s`` runs its list in order (with virtual stages rank ``r`` runs ``PipelinePlan.order[r]``,
its blocks' lists merged; read "block" for "stage" below), with point-to-point messages on one
2-rank process group per channel (``pipeline_actions.py``):

- ``<A c``: blocking receive of chunk c's hidden state ``[T_c, D]`` from stage s-1, the input of
  the forward that follows. ``>A c``: asynchronous send (``isend``) of the forward's output to
  stage s+1; keep the buffer until the send completes. Stage 0's input is the chunk's token ids.
- ``F c``: forward of the stage's layers; write the keys/values of the chunk's continuing segments
  into the stage's state store (state never leaves a stage). ``F c(drop)``: the same without
  autograd; keep only the stage input (``[T_c, D]``, the boundary checkpoint; free on stage 0).
  On the last stage the forward ends in the loss.
- ``<G c``: blocking receive of the gradient ``[T_c, D]`` of this stage's output of chunk c.
- ``R c``: recompute chunk c from its boundary checkpoint and the stored prefix state, with
  autograd, not writing the state again.
- ``B c``: backward of chunk c (output gradient from ``<G c``, or the loss on the last stage, plus
  the stored gradient of its keys/values). ``>G c``: asynchronous send of its input gradient to
  stage s-1 (none on stage 0). ``B c(in)``: the same without parameter gradients (split backward).
- ``W c``: chunk c's parameter gradients, after its ``B c(in)``; no message. Its activations stay
  until then.
- At the end of the step, wait for every outstanding send.

Example: 2 stages, a chain ``0 -> 1 -> 2`` plus standalone chunks 3 and 4, ``k = 1``, caps (2, 1);
forward 1, backward 2, recompute 1 time unit per chunk, free messages (``test_pipeline_plan.py``
keeps this text true)::

    stage 0: F0(drop) >A0 F1(drop) >A1 F2 >A2 F3 >A3 <G2 B2 R1 <G3 B3 F4 >A4 <G1 B1 R0 <G4 B4 <G0 B0
    stage 1: <A0 F0(drop) <A1 F1(drop) <A2 F2 B2 >G2 <A3 F3 B3 >G3 R1 B1 >G1 <A4 F4 B4 >G4 R0 B0 >G0

    time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19
    stage 0  F0 F1 F2 F3 .  .  B2 B2 R1 B3 B3 F4 B1 B1 R0 B4 B4 .  B0 B0
    stage 1  .  F0 F1 F2 B2 B2 F3 B3 B3 R1 B1 B1 F4 B4 B4 R0 B0 B0 .  .

Stage 0 forwards standalone chunk 3 while the chain waits for its backward (the gap the chain's
dependencies leave), then stops: live {2, 3} fill caps[0] = 2. The last stage runs the chain's
backward one chunk per turn with F3 B3 and F4 B4 in between, so chunk 3's gradient reaches stage 0
early. Stage 0 recomputes chunk 1 at time 8 while waiting (early recompute). Chunk 4 is admitted
at 11: B3 freed a slot, and R1's slot frees with B1 before R0 needs one. With blocking sends the lists
hang (stage 0 in ``>A3`` while stage 1 is in ``>G2``); with ``isend`` they finish.

The same chunks with ``k = 2`` (chunks 1 and 2 kept, caps (2, 2)) and ``split_backward=True``,
``B(in)`` and ``W`` 1 unit each (the unsplit backward's 2, halved; ``test_split_backward_plan.py``
keeps this text true; messages as above, none next to a ``W``), compute actions::

    stage 0: F0(drop) F1 F2 B2(in) B1(in) W2 F3 W1 R0 B0(in) B3(in) W0 F4 W3 B4(in) W4
    stage 1: F0(drop) F1 F2 B2(in) B1(in) W2 R0 B0(in) W1 F3 B3(in) W0 W3 F4 B4(in) W4

    time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18
    stage 0  F0 F1 F2 .  .  B2 B1 W2 F3 W1 R0 B0 B3 W0 F4 W3 .  B4 W4
    stage 1  .  F0 F1 F2 B2 B1 W2 R0 B0 W1 F3 B3 W0 W3 .  F4 B4 W4 .

The chain's input and state gradients ``B2 B1`` run back to back on both stages, ``W2`` deferred.
On stage 1, ``R0`` needs a slot while chunks 1 and 2 hold both: ``W2`` runs first (the cap forces
it), and ``W1`` fills the wait for chunk 3's input. On stage 0, ``F3`` waits for ``W2`` to free a
slot, and ``W1`` fills the wait for chunk 0's gradient. 19 time units; unsplit, the same chunks take 22.

Virtual stages (interleaved 1F1B, ``virtual = v > 1``)
-----------------------------------------------------
The model is cut into ``pp * v`` *blocks* of layers (``split_stages(num_layers, pp * v)``), block
``b`` on rank ``b % pp``: each rank holds ``v`` blocks that are not adjacent, so a chunk crosses
every rank ``v`` times and each crossing costs ``1/v`` of a stage; the pipeline fills and drains in
about ``1/v`` of the time. Everything above holds per block, read "block" for "stage": its own
forward and backward order, caps, admission, early recomputes and messages (``Comm.peer`` is a
block; every block pair and direction is its own channel, so the hop from rank ``pp - 1``'s block
``pp - 1`` to rank 0's block ``pp`` between rounds is an ordinary message). Block 0 fixes the
forward order, the last block (rank ``pp - 1``) the backward order. The cost model has one stage
per block (``CostModel.from_model(cfg, pp * v)``).

What is new is the resource: a rank runs one action at a time, whichever of its blocks it belongs
to. The event simulation keeps one clock per rank; when rank ``r`` is free it starts the first of

1. after a backward of the rank, the forward of the oldest chunk (earliest in the forward order)
   that one of its blocks may start: 1F1B per rank;
2. a backward, the deepest block first (the last block by its own rule above, which may start a
   forward instead): the deepest backward feeds the most blocks below it;
3. the forward of the oldest chunk, as in 1;
4. an early recompute (shallowest block first).

On uniform micro-batches this gives Megatron's interleaved 1F1B bubble ``(pp - 1) / (v m + pp - 1)``
exactly (``test_virtual_plan.py``: pp 2 and 4 at m = 4..32, pp 8 at m = 8 and 32). Without rule 1
the backward-first rule drains the backwards of all ``v`` blocks before feeding a forward and the
ranks fall into waves of ``pp`` chunks (at pp = 4, m = 32: bubble 0.19 instead of 0.045, worse than
``v = 1``). Ordering backwards by an estimate of their remaining path gained under 1% of step time
on ``benchmarks/pipeline_bubbles.py``, so the simpler rule stays. The merged execution order of
rank ``r`` (``PipelinePlan.order[r]``) is the order in which it started actions, each with its
messages as laid out in its block's list.

Caps default to ``default_caps(pp * v, k)``: block ``b`` holds at most ``max(pp v - b, k)`` chunks'
activations, each of ``1/v`` of a stage's layers. For ``v = 2, k = 1`` rank ``r`` (blocks ``r`` and
``r + pp``) holds at most ``(3 pp - 2 r) / 2`` stage-equivalents against ``pp - r`` with ``v = 1``:
1.5x on rank 0, ``(pp + 2) / 2`` instead of 1 on the last rank; Megatron's interleaved warm-up
holds about the same (``(v + 1) pp - 1`` blocks' activations on rank 0).

No deadlock: the per-block argument above is unchanged (a busy rank only delays the oldest unit's
next action, it does not forbid it), and each rank's order is the order in which the simulation
started its actions: every receive's message was sent by an action started earlier, so running
the ranks' orders with asynchronous sends finishes (``check_pipeline_plan`` proves it per plan on
the merged orders).

Example: ``pp = 2``, ``v = 2`` (blocks 0 and 2 on rank 0, 1 and 3 on rank 1), four standalone chunks,
``k = 1``, default caps (4, 3, 2, 1); per block forward 1, backward 2 time units per chunk, free
messages (``test_virtual_plan.py`` keeps this text true). Per block lists, ranks' orders (``F0/2``:
chunk 0's forward on block 2) and their time chart::

    stage 0: F0 >A0 F1 >A1 F2 >A2 F3 >A3 <G0 B0 <G1 B1 <G2 B2 <G3 B3
    stage 1: <A0 F0 >A0 <A1 F1 >A1 <A2 F2 >A2 <G0 B0 >G0 <A3 F3 >A3 <G1 B1 >G1 <G2 B2 >G2 <G3 B3 >G3
    stage 2: <A0 F0 >A0 <A1 F1 >A1 <G0 B0 >G0 <A2 F2 >A2 <G1 B1 >G1 <G2 B2 >G2 <A3 F3 >A3 <G3 B3 >G3
    stage 3: <A0 F0 B0 >G0 <A1 F1 B1 >G1 <A2 F2 B2 >G2 <A3 F3 B3 >G3

    rank 0: F0/0 F1/0 F0/2 F1/2 F2/0 F3/0 B0/2 F2/2 B1/2 B2/2 B0/0 F3/2 B1/0 B3/2 B2/0 B3/0
    rank 1: F0/1 F1/1 F0/3 B0/3 F2/1 F1/3 B1/3 F2/3 B2/3 B0/1 F3/1 B1/1 F3/3 B3/3 B2/1 B3/1

    time     0  1  2  3  4  5  6  7  8  9  10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26
    rank 0   F0 F1 F0 F1 F2 F3 B0 B0 F2 .  B1 B1 .  B2 B2 B0 B0 F3 B1 B1 .  B3 B3 B2 B2 B3 B3
    rank 1   .  F0 F1 F0 B0 B0 F2 F1 B1 B1 F2 B2 B2 B0 B0 F3 B1 B1 F3 B3 B3 B2 B2 B3 B3 .  .

The step takes 27 units; bubble 3/27 per rank = ``(pp - 1) / (v m + pp - 1)`` with m = 4. The
same chunks on 2 stages of twice the cost (``v = 1``) take 30, bubble 6/30.

Both together (``virtual = v > 1`` and ``split_backward=True``)
--------------------------------------------------------------
Every block splits its backwards as in "Split backward" (a block's pending ``W`` hold its slots, and a
block whose due recompute finds every slot taken runs its own oldest ``W`` first), and the rank rules
above get a fifth: 5. when nothing else can start, the rank's oldest pending ``W`` over all its blocks
(the one whose ``B(in)`` ran first). A ``W`` is emitted through the rank layer like every other action,
so it lands in ``PipelinePlan.order``; it does not count as the rank's last backward for rule 1 (a
``W`` fills idle time and leaves the 1F1B alternation where it was). No deadlock: a ``W`` waits for
nothing but its own ``B``, so the arguments above hold once the pending ``W`` are done. On ``m`` equal
chunks (``test_virtual_split_plan.py``; per stage forward 1, backward 2 split 1 + 1) the step at pp = 4,
m = 8 takes 33 (v = 1), 30 (v = 1, split), 28.5 (v = 2), 26.5 (both).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.cost import ActionCost, CostModel, action_time
from chunkflow_pl.schedule.graph import build_graph, forward_order
from chunkflow_pl.schedule.pipeline_actions import Action, Comm, CommOp, Op, PipeAction, PipelinePlan


def default_caps(pp: int, k: int) -> tuple[int, ...]:
    """Live-activation cap per stage: the 1F1B depth ``pp - s``, but at least ``k``."""
    return tuple(max(pp - s, k) for s in range(pp))


def plan_pipeline(
    chunks: Sequence[Sequence[Segment]],
    seq_lens: Sequence[int],
    pp: int,
    k: int,
    *,
    cost: ActionCost | None = None,
    caps: Sequence[int] | None = None,
    max_open_chains: int | None = 1,
    split_backward: bool = False,
    virtual: int = 1,
) -> PipelinePlan:
    """Per-stage action lists for one step of one pipeline replica (see the module docstring).

    ``chunks``: this replica's chunks (segment lists, empty for padding) indexed as in its
    ``StepBatch``; ``seq_lens``: lengths of every sequence of the global batch. ``cost`` orders the
    interleaving (default ``CostModel.uniform(pp)``); every rank must pass the same. ``caps``
    default ``default_caps(pp, k)``. ``max_open_chains``: chains whose state may be alive on a stage
    at once (``None``: no limit beyond the caps). ``split_backward``: every backward is
    ``BACKWARD(c, split=True)`` and a ``WEIGHT(c)`` follows later on the same stage (module docstring,
    "Split backward"). Without it and with ``pp = 1`` the compute actions are exactly the single-device
    order of Algorithm 2 (``tests/single_device_oracle.py``) minus those on empty chunks.

    ``virtual``: layer blocks per rank (interleaved 1F1B, module docstring "Virtual stages"): the plan has
    ``pp * virtual`` blocks, block ``b`` on rank ``b % pp``; ``cost`` then has one stage per block
    (``CostModel.from_model(cfg, pp * virtual)``) and ``caps`` one entry per block (default
    ``default_caps(pp * virtual, k)``).

    Raises ``ValueError`` on bad arguments or chunks that do not tile their sequences.
    """
    if pp < 1:
        raise ValueError(f"pp must be >= 1 (pipeline stages), got {pp}")
    if virtual < 1:
        raise ValueError(f"virtual must be >= 1 (layer blocks per rank; 1: no interleaving), got {virtual}")
    if virtual > 1 and pp < 2:
        raise ValueError(f"virtual={virtual} needs pp >= 2 ranks (interleaving hands blocks from rank to rank), "
                         f"got pp={pp}; use virtual=1")
    ranks, pp = pp, pp * virtual  # from here on ``pp`` counts blocks: each is a stage of the rules above
    if k < 1:
        raise ValueError(f"k must be >= 1 (chunks whose activations are kept), got {k}")
    if max_open_chains is not None and max_open_chains < 1:
        raise ValueError(f"max_open_chains must be >= 1 or None, got {max_open_chains}")
    cost = cost if cost is not None else CostModel.uniform(pp)
    if cost.pp != pp:
        raise ValueError(f"cost model has {cost.pp} stages, the plan {pp}"
                         + (f" blocks (pp={ranks} x virtual={virtual})" if virtual > 1 else ""))
    caps_t = tuple(int(c) for c in caps) if caps is not None else default_caps(pp, k)
    if len(caps_t) != pp or min(caps_t) < k:
        raise ValueError(f"caps {caps_t} must give each of the {pp} stages at least k={k} live chunks")

    graph = build_graph(chunks, seq_lens)
    tokens = tuple(sum(seg.length for seg in chunk) for chunk in chunks)
    units: list[_Unit] = []
    for members in graph.components:
        order = [c for c in forward_order(graph, members) if tokens[c] > 0]
        if order:  # an empty chunk has no segment, so it is a component of its own
            first_kept = max(0, len(order) - k)  # the last k forwards are the first k backwards
            units.append(_Unit(len(units), tuple(order), frozenset(order[first_kept:]), len(order) > 1))

    scheduler = _ListScheduler(units, chunks, pp, caps_t, cost, max_open_chains, split_backward, ranks)
    orders = scheduler.run()
    groups = [[_messages_around(a, s, pp, tokens) for a in order] for s, order in enumerate(orders)]
    stages = tuple(tuple(a for group in block for a in group) for block in groups)
    if virtual == 1:
        return PipelinePlan(stages=stages, caps=caps_t, chunk_tokens=tokens)
    return PipelinePlan(stages=stages, caps=caps_t, chunk_tokens=tokens, virtual=virtual,
                        order=_rank_order(groups, scheduler.rank_log))


@dataclass(frozen=True)
class _Unit:
    index: int
    order: tuple[int, ...]  # forward order
    kept: frozenset[int]
    is_chain: bool  # more than one chunk: key/value state passes between them


@dataclass
class _Stage:
    free_at: float = 0.0
    next_f: int = 0  # index into the forward order
    next_b: int = 0  # index into the backward order
    live: set[int] = field(default_factory=set)  # activations held: kept/recomputed, until backward (split: W)
    weights: deque[int] = field(default_factory=deque)  # split backward: chunks whose W is pending, oldest first
    to_recompute: dict[int, int] = field(default_factory=dict)  # unit -> dropped chunks forwarded, not recomputed
    forwarded: set[int] = field(default_factory=set)
    recomputed: set[int] = field(default_factory=set)  # recomputed ahead of its backward, still waiting
    backwarded: set[int] = field(default_factory=set)
    chain_ptr: int = 0  # oldest chain (index into _ListScheduler.chains) not yet fully backwarded here
    open_chains: int = 0
    chain_b_last: bool = False  # last stage: its previous action was a chain backward (1F1B alternation)
    started: list[Action] = field(default_factory=list)


class _ListScheduler:
    """The event simulation that fixes each stage's interleaving (module docstring)."""

    def __init__(self, units: list[_Unit], chunks: Sequence[Sequence[Segment]], pp: int, caps: tuple[int, ...],
                 cost: ActionCost, max_open_chains: int | None, split: bool,
                 ranks: int | None = None) -> None:
        self.units, self.chunks, self.pp, self.caps, self.cost = units, chunks, pp, caps, cost
        self.split = split
        self.last = pp - 1
        # Virtual stages: ``pp`` counts blocks, block b runs on rank b % ranks, one action of a rank at a time.
        self.ranks = pp if ranks is None else ranks
        self.blocks_of = [tuple(range(r, pp, self.ranks)) for r in range(self.ranks)]
        self.rank_log: list[list[tuple[int, int]]] = [[] for _ in range(self.ranks)]  # (block, compute index)
        self.b_seq: dict[tuple[int, int], int] = {}  # split backward: (block, chunk) -> when its B(in) ran
        self.max_open = math.inf if max_open_chains is None else max_open_chains
        self.unit_of = {c: u for u in units for c in u.order}
        # not yet started on stage 0, in index order
        self.pending_single = deque(u for u in units if not u.is_chain)
        self.pending_chains = deque(u for u in units if u.is_chain)
        self.f_order: list[int] = []  # fixed by stage 0, unit by unit
        self.b_order: list[int] = []  # fixed by the last stage as it starts backwards
        self.position: dict[int, int] = {}  # unit -> its place in the forward order of units
        self.chains: list[_Unit] = []  # chains in forward order
        self.total = sum(len(u.order) for u in units)
        self.stages = [_Stage() for _ in range(pp)]
        self.act_at: list[dict[int, float]] = [{} for _ in range(pp)]  # input of chunk arrives on stage s
        self.grad_at: list[dict[int, float]] = [{} for _ in range(pp)]  # output gradient arrives on stage s
        self.wake: list[float] = [0.0]

    def run(self) -> list[list[Action]]:
        while self.wake:
            now = heapq.heappop(self.wake)
            while self.wake and self.wake[0] == now:
                heapq.heappop(self.wake)
            for r in range(self.ranks):
                while self.stages[r].free_at <= now and self._start_rank(r, now):
                    pass
        if any(len(st.backwarded) < self.total or st.weights for st in self.stages):
            raise RuntimeError("scheduler stalled (a bug: the admission rule should prevent this): "
                               + "; ".join(self._describe(s) for s in range(self.pp)))
        return [st.started for st in self.stages]

    def _describe(self, s: int) -> str:
        st = self.stages[s]
        return (f"stage {s}: {st.next_f} forwards and {len(st.backwarded)} backwards of {self.total} done, "
                f"live {sorted(st.live)} (cap {self.caps[s]}), weights pending {list(st.weights)}")

    # ---- one decision ----------------------------------------------------------------------------
    def _start_rank(self, r: int, now: float) -> bool:
        """Rank ``r`` is free: start one action of one of its blocks (module docstring, "Virtual stages")."""
        blocks = self.blocks_of[r]
        if len(blocks) == 1:
            return self._start(r, now)
        inner = [b for b in blocks if b != self.last]
        if self._rank_last_was_backward(r) and self._start_rank_forward(inner, now):
            return True  # 1F1B on the rank: a ready forward after each backward
        # Backwards, the deepest block first (the last block by its own rule, which may start a forward too).
        if any(self._start_last(now) if b == self.last else self._start_backward(b, now) for b in reversed(blocks)):
            return True
        return (self._start_rank_forward(inner, now) or any(self._start_early_recompute(b, now) for b in inner)
                or self._start_rank_weight(blocks, now))

    def _start_rank_weight(self, blocks: Sequence[int], now: float) -> bool:
        """Split backward: the rank would idle, so it runs its oldest pending W (earliest B(in)) of any block."""
        pending = [b for b in blocks if self.stages[b].weights]
        if not pending:
            return False
        return self._start_weight(min(pending, key=lambda b: self.b_seq[b, self.stages[b].weights[0]]), now)

    def _start_rank_forward(self, inner: Sequence[int], now: float) -> bool:
        """The forward of the oldest chunk (earliest in the forward order) among ``inner`` blocks ready for one."""
        oldest = sorted(inner, key=lambda b: (self.stages[b].next_f, -b))
        return any(self._start_forward(b, now) for b in oldest)

    def _rank_last_was_backward(self, r: int) -> bool:
        """Whether the rank's last action other than a W was a backward: a W fills idle time and leaves the
        1F1B alternation where it was."""
        for b, i in reversed(self.rank_log[r]):
            op = self.stages[b].started[i].op
            if op is not Op.WEIGHT:
                return op is Op.BACKWARD
        return False

    def _start(self, s: int, now: float) -> bool:
        if s == self.last:
            return self._start_last(now) or self._start_weight(s, now)
        return (self._start_backward(s, now) or self._start_forward(s, now) or self._start_early_recompute(s, now)
                or self._start_weight(s, now))

    def _start_last(self, now: float) -> bool:
        """The last stage fixes the backward order: a standalone chunk's backward right after its
        forward; a chain's backwards in reverse, alternating with forwards that are ready (1F1B), so
        upstream stages get work while the chain drains. On one stage, plain backward-first."""
        st, s = self.stages[self.last], self.last
        c = self.f_order[st.next_f - 1] if st.next_f else None
        if c is not None and not self.unit_of[c].is_chain and c not in st.backwarded:
            return self._backward(s, c, now)
        chain_c = self._chain_candidate(s)
        if chain_c is not None and (self.pp == 1 or not st.chain_b_last or not self._forward_ready(s, now)):
            if self._weight_for_room(s, chain_c, now):
                return True
            if self._backward(s, chain_c, now):
                st.chain_b_last = True
                return True
        if self._start_forward(s, now):
            st.chain_b_last = False
            return True
        return False

    def _start_backward(self, s: int, now: float) -> bool:
        st = self.stages[s]
        if st.next_b >= len(self.b_order):
            return False
        c = self.b_order[st.next_b]
        if self.grad_at[s].get(c, math.inf) > now:
            return False
        return self._weight_for_room(s, c, now) or self._backward(s, c, now)

    def _backward(self, s: int, c: int, now: float) -> bool:
        """Backward of ``c`` on stage ``s``, recomputing it first if needed (and a slot is free)."""
        st = self.stages[s]
        unit = self.unit_of[c]
        t = now
        if c not in unit.kept and c not in st.recomputed:
            if len(st.live) + 1 > self.caps[s]:
                return False
            t += self._recompute(s, c)
        action = Action(Op.BACKWARD, c, split=self.split)
        self._emit(s, action)
        t += action_time(self.cost, action, s, self.chunks[c])
        if not self.split:
            st.live.discard(c)
        elif self.pp == 1:  # one device never idles: W at once, so memory stays the unsplit plan's
            t += self._weight(s, c)
        else:
            st.weights.append(c)  # its activations stay live until its WEIGHT
            self.b_seq[s, c] = len(self.b_seq)  # a rank runs its blocks' pending Ws oldest B first
        st.recomputed.discard(c)
        st.backwarded.add(c)
        if s == self.last:
            self.b_order.append(c)
        st.next_b += 1
        if unit.is_chain and c == unit.order[0]:  # its last backward: the chain's state is gone
            st.open_chains -= 1
        self._busy(s, t)
        if s > 0:
            self.grad_at[s - 1][c] = t + self.cost.comm_time(self._tokens(c))
            heapq.heappush(self.wake, self.grad_at[s - 1][c])
        return True

    def _recompute(self, s: int, c: int) -> float:
        st = self.stages[s]
        self._emit(s, Action(Op.RECOMPUTE, c))
        st.live.add(c)
        st.recomputed.add(c)
        st.to_recompute[self.unit_of[c].index] -= 1
        return self.cost.op_time(Op.RECOMPUTE, s, c, self.chunks[c])

    def _weight_for_room(self, s: int, c: int, now: float) -> bool:
        """Run the oldest pending W when backward ``c`` is due but its recompute finds no free slot: only a W
        frees a slot before that backward, which is on the critical path."""
        st = self.stages[s]
        needs_slot = c not in self.unit_of[c].kept and c not in st.recomputed
        if not (st.weights and needs_slot and len(st.live) + 1 > self.caps[s]):
            return False
        return self._start_weight(s, now)

    def _start_weight(self, s: int, now: float) -> bool:
        """The oldest pending W (split backward), when the stage would otherwise idle: it waits for
        nothing but its own B, which ran earlier on this stage, and frees that chunk's slot."""
        st = self.stages[s]
        if not st.weights:
            return False
        self._busy(s, now + self._weight(s, st.weights.popleft()))
        return True

    def _weight(self, s: int, c: int) -> float:
        action = Action(Op.WEIGHT, c)
        self._emit(s, action)
        self.stages[s].live.discard(c)
        return action_time(self.cost, action, s, self.chunks[c])

    def _start_early_recompute(self, s: int, now: float) -> bool:
        """An idle stage recomputes the next dropped chunk of its oldest chain before the gradient
        arrives, taking the recompute off the backward wave's critical path. It uses the slot the
        admission rule keeps free for exactly this recompute."""
        c = self._chain_candidate(s)
        st = self.stages[s]
        if c is None or c in self.unit_of[c].kept or c in st.recomputed or len(st.live) + 1 > self.caps[s]:
            return False
        self._busy(s, now + self._recompute(s, c))
        return True

    def _chain_candidate(self, s: int) -> int | None:
        """Next backward of the oldest chain not yet done on stage ``s``, once all its forwards ran."""
        st = self.stages[s]
        while st.chain_ptr < len(self.chains) and self.chains[st.chain_ptr].order[0] in st.backwarded:
            st.chain_ptr += 1
        if st.chain_ptr == len(self.chains):
            return None
        unit = self.chains[st.chain_ptr]
        if unit.order[-1] not in st.forwarded:
            return None
        return next(c for c in reversed(unit.order) if c not in st.backwarded)

    def _forward_ready(self, s: int, now: float) -> bool:
        st = self.stages[s]
        if st.next_f == len(self.f_order):
            return False
        c = self.f_order[st.next_f]
        return self.act_at[s].get(c, math.inf) <= now and self._admitted(s, c)

    def _start_forward(self, s: int, now: float) -> bool:
        st = self.stages[s]
        if st.next_f == len(self.f_order) and not (s == 0 and self._take_unit()):
            return False
        c = self.f_order[st.next_f]
        if s > 0 and self.act_at[s].get(c, math.inf) > now:
            return False
        if not self._admitted(s, c):
            return False
        unit = self.unit_of[c]
        keep = c in unit.kept
        self._emit(s, Action(Op.FORWARD, c, keep=keep))
        if keep:
            st.live.add(c)
        else:
            st.to_recompute[unit.index] = st.to_recompute.get(unit.index, 0) + 1
        if unit.is_chain and c == unit.order[0]:
            st.open_chains += 1
        st.forwarded.add(c)
        st.next_f += 1
        t = now + self.cost.op_time(Op.FORWARD, s, c, self.chunks[c], keep)
        self._busy(s, t)
        if s < self.pp - 1:
            self.act_at[s + 1][c] = t + self.cost.comm_time(self._tokens(c))
            heapq.heappush(self.wake, self.act_at[s + 1][c])
        return True

    def _admitted(self, s: int, c: int) -> bool:
        unit = self.unit_of[c]
        if c not in unit.kept:
            return True  # a dropped forward holds no activations after it ends
        st = self.stages[s]
        if len(st.live) + 1 > self.caps[s]:
            return False
        if s == self.last and not unit.is_chain:
            return True  # its backward follows at once: the slot is free again before any recompute
        # An earlier unit with a dropped chunk still to recompute will need one slot once its own kept
        # chunks are gone; by then only chunks of units after it can be live. Keep that slot free.
        waiting = [self.position[u] for u, n in st.to_recompute.items() if n > 0 and u != unit.index]
        if not waiting:
            return True
        oldest = min(waiting)
        after = sum(1 for x in st.live if self.position[self.unit_of[x].index] > oldest)
        return after + 1 + 1 <= self.caps[s]

    def _take_unit(self) -> bool:
        """Stage 0 starts the first pending unit it may start now; False when there is none.

        Standalone units all pass or fail admission alike, so only the first one needs a look.
        """
        st = self.stages[0]
        pick = None
        if self.pending_single and self._admitted(0, self.pending_single[0].order[0]):
            pick = self.pending_single
        if st.open_chains < self.max_open:
            for i, unit in enumerate(self.pending_chains):
                if pick is not None and unit.index > pick[0].index:
                    break
                if self._admitted(0, unit.order[0]):
                    self.pending_chains.rotate(-i)  # bring it to the front (rare: chains are few)
                    unit = self.pending_chains.popleft()
                    self.pending_chains.rotate(i)
                    self._append(unit)
                    return True
        if pick is None:
            return False
        self._append(pick.popleft())
        return True

    def _append(self, unit: _Unit) -> None:
        self.position[unit.index] = len(self.position)
        if unit.is_chain:
            self.chains.append(unit)
        self.f_order.extend(unit.order)

    def _emit(self, s: int, a: Action) -> None:
        self.rank_log[s % self.ranks].append((s, len(self.stages[s].started)))
        self.stages[s].started.append(a)

    def _busy(self, s: int, until: float) -> None:
        for b in self.blocks_of[s % self.ranks]:  # the rank is one resource: all its blocks wait
            self.stages[b].free_at = until
        heapq.heappush(self.wake, until)

    def _tokens(self, c: int) -> int:
        return sum(seg.length for seg in self.chunks[c])


def _messages_around(a: Action, s: int, pp: int, tokens: Sequence[int]) -> list[PipeAction]:
    """A compute action of stage (block) ``s`` with the messages that feed it and carry its result.

    The gradient receive goes right before the backward, after any recompute: a recompute needs
    only the stored input, so it may run while the gradient is still on its way.
    """
    c, t = a.chunk, tokens[a.chunk]
    out: list[PipeAction] = []
    if a.op is Op.FORWARD:
        if s > 0:
            out.append(Comm(CommOp.RECV_ACT, c, s - 1, t))
        out.append(a)
        if s < pp - 1:
            out.append(Comm(CommOp.SEND_ACT, c, s + 1, t))
    elif a.op in (Op.RECOMPUTE, Op.WEIGHT):  # no message: a recompute reads its stored input
        out.append(a)
    else:
        if s < pp - 1:
            out.append(Comm(CommOp.RECV_GRAD, c, s + 1, t))
        out.append(a)
        if s > 0:
            out.append(Comm(CommOp.SEND_GRAD, c, s - 1, t))
    return out


def _rank_order(groups: Sequence[Sequence[Sequence[PipeAction]]],
                rank_log: Sequence[Sequence[tuple[int, int]]]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``PipelinePlan.order``: each rank's compute actions in the order it started them, each with its messages.

    ``groups[b][j]``: block ``b``'s ``j``-th compute action with its messages, as laid out in ``stages[b]``;
    ``rank_log[r]``: ``(block, j)`` in the order rank ``r`` started them.
    """
    first = [[0] * len(block) for block in groups]  # index in stages[b] of group j's first action
    for b, block in enumerate(groups):
        at = 0
        for j, group in enumerate(block):
            first[b][j] = at
            at += len(group)
    return tuple(tuple((b, first[b][j] + i) for b, j in log for i in range(len(groups[b][j]))) for log in rank_log)
