"""Execute per-stage pipeline plans against a cost model: step time, bubbles, memory, timed events.

Execution model (the runtime's, see ``scheduler``): each stage runs its list in order, one
compute action at a time; a send posts its message and the stage goes on at once; the message
arrives ``cost.comm_time(T)`` later; a receive waits for the matching send's arrival (the k-th
receive of a channel gets its k-th send). Link contention and compute/transfer overlap effects are
not modelled. A plan that cannot finish (see ``pipeline_checker``) raises ``RuntimeError``.
``WEIGHT`` actions (split backward) are compute like the others: timed, busy, never idle.

Virtual stages (``PipelinePlan.virtual > 1``): a rank is the resource. It runs its merged order
(``PipelinePlan.rank_actions``), one compute action at a time over all its blocks; messages travel
per block pair as above. Step time, busy time and bubbles (idle fraction) are then per *rank*, and
events carry the rank as their ``stage`` (one timeline row per rank, ``event_blocks`` says whose
layers ran); memory peaks stay per block (each block holds ``1/virtual`` of a stage's layers).

Memory counted per stage, each as a running peak:

- live activations: chunks from a kept forward or a recompute until their backward (a split
  backward's chunk until its ``WEIGHT``: what the weight gradient reads stays until then);
- boundary tokens: the ``[T, D]`` inputs kept by dropped forwards until their recompute (0 on
  stage 0, whose input is token ids);
- state tokens: keys/values of continuing segments written by forwards, held until the backward
  of the sequence's first piece (the executor's state store; times layers x K/V width for bytes).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.cost import ActionCost, action_time
from chunkflow_pl.schedule.graph import build_graph
from chunkflow_pl.schedule.pipeline_actions import Action, Channel, Comm, Op, PipelinePlan
from chunkflow_pl.schedule.timeline import TimedEvent, timeline_stats


@dataclass(frozen=True)
class SimResult:
    step_time: float
    busy: tuple[float, ...]  # compute time by stage (by rank for virtual stages)
    bubble: tuple[float, ...]  # idle fraction by stage (by rank for virtual stages)
    bubble_total: float  # idle fraction over all stages (ranks)
    peak_live: tuple[int, ...]  # most chunks holding activations at once, by stage (by block)
    peak_boundary_tokens: tuple[int, ...]
    peak_state_tokens: tuple[int, ...]
    events: tuple[TimedEvent, ...]  # compute actions in start order per stage (rank), stage by stage
    event_blocks: tuple[int, ...] = ()  # the block of each event; virtual stages only (else its stage)


def simulate(
    plan: PipelinePlan, chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int], cost: ActionCost
) -> SimResult:
    """Run ``plan`` (its stages' lists) with ``cost``; ``chunks``/``seq_lens`` as given to the scheduler."""
    pp, ranks = plan.pp, plan.ranks
    if cost.pp != pp:
        raise ValueError(f"cost model has {cost.pp} stages, the plan {pp}")
    lanes = [plan.rank_actions(r) for r in range(ranks)]  # (block, action); block = rank when virtual == 1
    who = "rank" if plan.virtual > 1 else "stage"
    clock = [0.0] * ranks
    pc = [0] * ranks
    arrivals: dict[Channel, deque[tuple[int, float]]] = {}  # posted, not yet received: (chunk, arrival)
    events: list[list[TimedEvent]] = [[] for _ in range(ranks)]
    blocks: list[list[int]] = [[] for _ in range(ranks)]
    memory = [_StageMemory(s, seq_lens) for s in range(pp)]

    progressed = True
    while progressed:
        progressed = False
        for r in range(ranks):
            lane = lanes[r]
            while pc[r] < len(lane):
                s, a = lane[pc[r]]
                if isinstance(a, Comm):
                    ch = a.channel(s)
                    if a.is_send:
                        arrivals.setdefault(ch, deque()).append((a.chunk, clock[r] + cost.comm_time(a.tokens)))
                    else:
                        queue = arrivals.get(ch)
                        if not queue:
                            break  # its send is not posted yet: try the other stages
                        chunk, at = queue.popleft()
                        if chunk != a.chunk:
                            raise RuntimeError(f"{who} {r}: {a} received chunk {chunk} on channel {ch}; "
                                               "check the plan with check_pipeline")
                        clock[r] = max(clock[r], at)
                else:
                    d = action_time(cost, a, s, chunks[a.chunk])
                    events[r].append(TimedEvent(r, a.op.value, a.chunk, clock[r], clock[r] + d))
                    blocks[r].append(s)
                    clock[r] += d
                    memory[s].apply(a, chunks[a.chunk])
                pc[r] += 1
                progressed = True
    stuck = [r for r in range(ranks) if pc[r] < len(lanes[r])]
    if stuck:
        heads = ", ".join(f"{who} {r} at action {pc[r]} ({lanes[r][pc[r]][1]})" for r in stuck)
        raise RuntimeError(f"plan cannot finish: {heads}; check_pipeline explains why")

    flat = tuple(e for stage_events in events for e in stage_events)
    stats = timeline_stats(flat, ranks)
    return SimResult(
        step_time=stats.step_time,
        busy=stats.busy,
        bubble=stats.bubble,
        bubble_total=stats.bubble_total,
        peak_live=tuple(m.peak_live for m in memory),
        peak_boundary_tokens=tuple(m.peak_boundary for m in memory),
        peak_state_tokens=tuple(m.peak_state for m in memory),
        events=flat,
        event_blocks=tuple(b for lane in blocks for b in lane) if plan.virtual > 1 else (),
    )


class _StageMemory:
    def __init__(self, stage: int, seq_lens: Sequence[int]) -> None:
        self.stage, self.seq_lens = stage, seq_lens
        self.live: set[int] = set()
        self.boundary: dict[int, int] = {}  # dropped chunk -> tokens of its kept input
        self.state: dict[int, int] = {}  # sequence -> key/value tokens stored
        self.peak_live = self.peak_boundary = self.peak_state = 0

    def apply(self, a: Action, segments: Sequence[Segment]) -> None:
        tokens = sum(seg.length for seg in segments)
        if a.op is Op.FORWARD:
            if a.keep:
                self.live.add(a.chunk)
            elif self.stage > 0:
                self.boundary[a.chunk] = tokens
            for seg in segments:
                if seg.end < self.seq_lens[seg.seq]:  # continued by a later chunk: its K/V are stored
                    self.state[seg.seq] = self.state.get(seg.seq, 0) + seg.length
        elif a.op is Op.RECOMPUTE:
            self.live.add(a.chunk)
            self.boundary.pop(a.chunk, None)  # now held by the recompute's graph, counted as live
        elif a.op is Op.WEIGHT:
            self.live.discard(a.chunk)
        else:
            if not a.split:
                self.live.discard(a.chunk)
            for seg in segments:  # the state gradient is a split backward's too: state goes at B(in)
                if seg.start == 0:  # the sequence's first piece runs backward last
                    self.state.pop(seg.seq, None)
        self.peak_live = max(self.peak_live, len(self.live))
        self.peak_boundary = max(self.peak_boundary, sum(self.boundary.values()))
        self.peak_state = max(self.peak_state, sum(self.state.values()))


def lower_bound(
    plan: PipelinePlan, chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int], cost: ActionCost
) -> tuple[float, float]:
    """Two floors under any schedule of this plan's actions: ``(busiest stage, critical path)``.

    The busiest stage's (rank's, for virtual stages) compute time; and the longest dependency path
    (forward through the stages and along each sequence's pieces, the loss, backward back down and
    along the pieces in reverse, messages included, recomputes anywhere after their forward, a split
    backward's ``WEIGHT`` anywhere after it), ignoring that a stage runs one action at a time.
    """
    graph = build_graph(chunks, seq_lens)
    pp = plan.pp
    busy = [0.0] * plan.ranks
    dropped = [set() for _ in range(pp)]
    backward: list[dict[int, Action]] = [{} for _ in range(pp)]  # the backward action of each chunk, by stage
    for s in range(pp):
        acts = plan.compute(s)
        # fsum per block, then per rank: with virtual == 1 exactly the per-stage sums
        busy[s % plan.ranks] += math.fsum(action_time(cost, a, s, chunks[a.chunk]) for a in acts)
        dropped[s] = {a.chunk for a in acts if a.op is Op.RECOMPUTE}
        backward[s] = {a.chunk: a for a in acts if a.op is Op.BACKWARD}
    busiest = max(busy)
    order = [a.chunk for a in plan.compute(0) if a.op is Op.FORWARD]  # a valid forward order
    msg = {c: cost.comm_time(sum(seg.length for seg in chunks[c])) for c in order}
    f_end: dict[tuple[int, int], float] = {}
    for c in order:
        for s in range(pp):
            start = max([f_end[(c, s - 1)] + msg[c]] if s else [0.0])
            start = max([start] + [f_end[(p, s)] for p in graph.fwd_deps[c] if (p, s) in f_end])
            f_end[(c, s)] = start + cost.op_time(Op.FORWARD, s, c, chunks[c], c not in dropped[s])
    b_end: dict[tuple[int, int], float] = {}
    ends = [0.0]
    for c in reversed(order):  # reverse forward order is a valid backward order
        for s in reversed(range(pp)):
            ready = f_end[(c, s)]
            if c in dropped[s]:
                ready += cost.op_time(Op.RECOMPUTE, s, c, chunks[c])
            start = max([ready] + ([b_end[(c, s + 1)] + msg[c]] if s < pp - 1 else []))
            start = max([start] + [b_end[(m, s)] for m in graph.bwd_deps[c] if (m, s) in b_end])
            b = backward[s][c]
            b_end[(c, s)] = start + action_time(cost, b, s, chunks[c])
            ends.append(b_end[(c, s)] + (cost.op_time(Op.WEIGHT, s, c, chunks[c]) if b.split else 0.0))
    return busiest, max(ends)
