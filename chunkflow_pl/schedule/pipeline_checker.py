"""Prove a set of per-stage pipeline action lists valid before any rank runs them.

Any lists, not only the scheduler's. Checked in this order, each error naming stage, action and rule:

1. **Compute, per stage** (``check_counts``, ``replay_compute``): every chunk with tokens has one
   forward and one backward on every stage, chunks without tokens have no action; dependencies
   inside the stage (state: forward after the previous piece's forward, backward after the next
   piece's backward); recompute exactly for dropped forwards, before their backward; live
   activations never above ``caps[s]``. Split backward: a split ``B c(in)`` has exactly one ``W c``
   later on the same stage, an unsplit backward none; the chunk counts as live until its ``W``.
2. **Messages, per stage**: stage ``s > 0`` receives each chunk's input (``<A``) from ``s - 1``
   before its forward and sends its input gradient (``>G``) to ``s - 1`` after its backward; stage
   ``s < pp - 1`` sends the output (``>A``) to ``s + 1`` after the forward and receives its gradient
   (``<G``) before the backward. Each message names the chunk's token count. Together with 3 and
   4 this orders every forward after the previous stage's and every backward after the next one's.
3. **Channels**: the k-th send and the k-th receive of each channel name the same chunk and size
   (NCCL and gloo match point-to-point messages in posting order per process group).
4. **Progress**: a strict, untimed execution. Receives block until their send is posted. With
   ``sends="async"`` (``isend``, buffer kept until completion: the runtime) a send never blocks;
   with ``sends="blocking"`` a send completes only together with its receive (a rendezvous), the
   model of a blocking ``send`` whose peer has no buffer. If no stage can move, the plan deadlocks
   and the error lists what every stage is stuck on.

Virtual stages (``PipelinePlan.virtual > 1``, interleaved 1F1B): ``stages`` are per block and rules
1-3 hold per block (a message's peer is a block, every block pair and direction its own channel).
First ``order`` itself is checked (``check_rank_order``): one list per rank, holding every action of
its blocks exactly once, each block's in its own list order, and only blocks ``b`` with
``b % ranks == r`` on rank ``r``. Rule 4 then runs on the ranks' merged orders: a rank blocks on the
head of *its* order, so per-block lists that finish alone may still deadlock once merged (rank 0
waiting in block 0 for a gradient that needs a forward rank 0 would only reach later in block 2).

gloo tolerates orders that hang on NCCL, so a CPU test run is no proof of deadlock freedom; this is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.graph import ChunkGraph, build_graph
from chunkflow_pl.schedule.pipeline_actions import Action, Channel, Comm, CommOp, Op, PipeAction, PipelinePlan

Sends = Literal["async", "blocking"]


class PlanError(ValueError):
    """A step plan breaks a scheduling rule."""


class DeadlockError(PlanError):
    """The lists are each consistent, but no execution order finishes them."""


def check_pipeline_plan(
    plan: PipelinePlan, chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int], *, sends: Sends = "async"
) -> None:
    """``check_pipeline`` on a plan's lists with its caps; also checks its ``chunk_tokens``, and for virtual
    stages its ``order`` (``check_rank_order``) and progress on the ranks' merged orders."""
    tokens = tuple(sum(seg.length for seg in chunk) for chunk in chunks)
    if plan.chunk_tokens != tokens:
        raise PlanError(f"plan.chunk_tokens {plan.chunk_tokens} differ from the chunks' token counts {tokens}")
    order = None
    if plan.virtual != 1 or plan.order is not None:
        check_rank_order(plan)
        order = plan.order
    check_pipeline(plan.stages, chunks, seq_lens, plan.caps, sends=sends, order=order)


def check_rank_order(plan: PipelinePlan) -> None:
    """``plan.order`` is each rank's merge of its blocks' lists (``PipelinePlan``'s contract), or ``PlanError``."""
    v, n = plan.virtual, len(plan.stages)
    if v < 1 or n % v:
        raise PlanError(f"virtual={v}: the plan's {n} block lists must be a multiple of virtual >= 1")
    ranks = n // v
    if v == 1:
        if plan.order is not None:
            raise PlanError("virtual=1 plans carry no order (rank r runs stages[r]); set order=None")
        return
    if ranks < 2:
        raise PlanError(f"virtual={v} on {ranks} rank: interleaved blocks need pp >= 2 ranks")
    if plan.order is None or len(plan.order) != ranks:
        got = "None" if plan.order is None else f"{len(plan.order)} lists"
        raise PlanError(f"virtual={v} with {n} blocks needs order: one list per rank ({ranks}), got {got}")
    nxt = [0] * n  # per block: the index its next entry must name
    for r, lane in enumerate(plan.order):
        for pos, (b, i) in enumerate(lane):
            where = f"rank {r}, order position {pos} (block {b}, index {i})"
            if not 0 <= b < n:
                raise PlanError(f"{where}: block {b} out of range [0, {n})")
            if b % ranks != r:
                raise PlanError(f"{where}: block {b} runs on rank {b % ranks} (block b on rank b % {ranks}), not {r}")
            if i != nxt[b]:
                raise PlanError(f"{where}: block {b}'s list must run in its own order, next is its action "
                                f"{nxt[b]}" + (f" ({plan.stages[b][nxt[b]]})" if nxt[b] < len(plan.stages[b]) else
                                               " (none: the list is done)"))
            nxt[b] += 1
    for b in range(n):
        if nxt[b] != len(plan.stages[b]):
            raise PlanError(f"rank {b % ranks}'s order runs {nxt[b]} of block {b}'s {len(plan.stages[b])} actions")


def check_pipeline(
    stages: Sequence[Sequence[PipeAction]],
    chunks: Sequence[Sequence[Segment]],
    seq_lens: Sequence[int],
    caps: Sequence[int],
    *,
    sends: Sends = "async",
    order: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> None:
    """Raise ``PlanError`` (``DeadlockError`` for 4) for the first broken rule; ``None`` if valid.

    ``order`` (virtual stages, ``PipelinePlan.order``, already checked by ``check_rank_order``): run rule 4
    on the ranks' merged orders instead of one list per stage."""
    if sends not in ("async", "blocking"):
        raise ValueError(f"sends must be 'async' or 'blocking', got {sends!r}")
    pp = len(stages)
    if pp < 1 or len(caps) != pp:
        raise PlanError(f"need one action list and one cap per stage, got {pp} lists and {len(caps)} caps")
    graph = build_graph(chunks, seq_lens)
    tokens = [sum(seg.length for seg in chunk) for chunk in chunks]
    required = [c for c in range(graph.num_chunks) if tokens[c] > 0]
    for s, acts in enumerate(stages):
        where = f"stage {s}, "
        compute = [(i, a) for i, a in enumerate(acts) if isinstance(a, Action)]
        check_counts(compute, graph.num_chunks, required, where=where)
        _check_messages(acts, s, pp, tokens, required)
        replay_compute(compute, graph, caps[s], where=where, cap_name="cap")
    _check_channels(stages)
    if order is None:
        _check_progress([[(s, a) for a in acts] for s, acts in enumerate(stages)], sends, virtual=False)
    else:
        _check_progress([[(b, stages[b][i]) for b, i in lane] for lane in order], sends, virtual=True)


def replay_compute(
    indexed: Sequence[tuple[int, Action]], graph: ChunkGraph, cap: int, *, where: str = "", cap_name: str = "k"
) -> int:
    """Replay compute actions in order against ``graph``; return the peak of live activations.

    ``indexed`` holds ``(position in the caller's list, action)``, so errors point into that list
    (``where`` prefixes them, e.g. ``"stage 1, "``). Counts must already be exact (``check_counts``):
    each chunk in ``indexed`` has one forward and one backward.
    """
    kept: dict[int, bool] = {}  # chunk -> keep flag of its forward, once it ran
    backed: set[int] = set()
    waiting: set[int] = set()  # split backward ran, WEIGHT not yet: still live
    recomputed: set[int] = set()
    live: set[int] = set()
    peak = 0
    for i, a in indexed:
        c = a.chunk

        def fail(rule: str, i: int = i, a: Action = a) -> PlanError:
            return PlanError(f"{where}action {i} ({a}): {rule}")

        if a.op is Op.FORWARD:
            for p in sorted(graph.fwd_deps[c]):
                if p not in kept:
                    raise fail(f"forward of chunk {c} before the forward of chunk {p} it depends on")
            kept[c] = a.keep
            if a.keep:
                live.add(c)
        elif a.op is Op.RECOMPUTE:
            if c in backed:
                raise fail(f"recompute of chunk {c} after its backward")
            if c not in kept:
                raise fail(f"recompute of chunk {c} before its forward")
            if kept[c]:
                raise fail(f"recompute of chunk {c} whose forward kept its activations")
            if c in recomputed:
                raise fail(f"second recompute of chunk {c}")
            recomputed.add(c)
            live.add(c)
        elif a.op is Op.WEIGHT:
            if c not in waiting:
                raise fail(f"weight gradient of chunk {c} before its split backward")
            waiting.discard(c)
            live.discard(c)
        else:
            if c not in kept:
                raise fail(f"backward of chunk {c} before its own forward")
            for m in sorted(graph.bwd_deps[c]):
                if m not in backed:
                    raise fail(f"backward of chunk {c} before the backward of chunk {m} it depends on")
            if not kept[c] and c not in recomputed:
                raise fail(f"backward of chunk {c} without a recompute of its dropped forward")
            backed.add(c)
            if a.split:
                waiting.add(c)  # what the weight gradient reads stays until the WEIGHT
            else:
                live.discard(c)
        if len(live) > cap:
            held = f"; {sorted(waiting)} wait for their WEIGHT" if waiting else ""
            raise fail(f"live activations {len(live)} exceed {cap_name}={cap} (chunks {sorted(live)}{held})")
        peak = max(peak, len(live))
    return peak


def check_counts(indexed: Sequence[tuple[int, Action]], n: int, required: Iterable[int], *, where: str = "") -> None:
    """Exactly one FORWARD and one BACKWARD of every chunk in ``required``, none of any other chunk;
    one WEIGHT of each chunk whose backward is split, none of any other.

    Counted before replaying the order, so a missing action reads as missing rather than as a
    dependency broken later by the chunk that needed it.
    """
    need = set(required)
    seen: dict[Op, set[int]] = {Op.FORWARD: set(), Op.BACKWARD: set(), Op.WEIGHT: set()}
    split = {a.chunk for _, a in indexed if a.op is Op.BACKWARD and a.split}
    for i, a in indexed:
        if not 0 <= a.chunk < n:
            raise PlanError(f"{where}action {i} ({a}): chunk index {a.chunk} out of range [0, {n})")
        if a.chunk not in need:
            raise PlanError(f"{where}action {i} ({a}): chunk {a.chunk} has no tokens, so no action may name it")
        if a.op in seen:
            if a.chunk in seen[a.op]:
                raise PlanError(f"{where}action {i} ({a}): duplicate {a.op.name} of chunk {a.chunk}")
            seen[a.op].add(a.chunk)
    for op in (Op.FORWARD, Op.BACKWARD):
        missing = sorted(need - seen[op])
        if missing:
            raise PlanError(f"{where}missing {op.name} of chunks {missing}")
    for i, a in indexed:
        if a.op is Op.WEIGHT and a.chunk not in split:
            raise PlanError(f"{where}action {i} ({a}): WEIGHT of chunk {a.chunk}, whose backward is not split (an "
                            "unsplit backward adds the parameter gradients itself)")
    missing = sorted(split - seen[Op.WEIGHT])
    if missing:
        raise PlanError(f"{where}missing WEIGHT of chunks {missing}: their backward is split (B(in)), so their "
                        "parameter gradients need a WEIGHT later on the same stage")


def _expected(s: int, pp: int) -> dict[CommOp, int]:
    """Message ends stage ``s`` must hold for every chunk, with their peer."""
    out = {}
    if s > 0:
        out[CommOp.RECV_ACT] = out[CommOp.SEND_GRAD] = s - 1
    if s < pp - 1:
        out[CommOp.SEND_ACT] = out[CommOp.RECV_GRAD] = s + 1
    return out


def _check_messages(acts: Sequence[PipeAction], s: int, pp: int, tokens: Sequence[int], required: list[int]) -> None:
    expected = _expected(s, pp)
    at: dict[tuple[object, int], int] = {}  # (op, chunk) -> position, compute and messages alike
    for i, a in enumerate(acts):
        if isinstance(a, Comm):
            def fail(rule: str, i: int = i, a: Comm = a) -> PlanError:
                return PlanError(f"stage {s}, action {i} ({a}): {rule}")

            if a.op not in expected:
                raise fail(f"stage {s} of {pp} has no {a.op.name} (it {_ends(s, pp)})")
            if a.peer != expected[a.op]:
                raise fail(f"{a.op.name} must name peer stage {expected[a.op]}, not {a.peer}")
            if not 0 <= a.chunk < len(tokens):
                raise fail(f"chunk index {a.chunk} out of range [0, {len(tokens)})")
            if a.tokens != tokens[a.chunk] or a.tokens <= 0:
                raise fail(f"message size {a.tokens} tokens, but chunk {a.chunk} has {tokens[a.chunk]}"
                           + (" (padding chunks send nothing)" if tokens[a.chunk] == 0 else ""))
            if (a.op, a.chunk) in at:
                raise fail(f"duplicate {a.op.name} of chunk {a.chunk}")
        at.setdefault((a.op, a.chunk), i)
    for c in required:
        for op in expected:
            if (op, c) not in at:
                raise PlanError(f"stage {s}: missing {op.name} of chunk {c}")
        f, b = at[(Op.FORWARD, c)], at[(Op.BACKWARD, c)]
        rules = [
            (CommOp.RECV_ACT, f, "<", "receive of chunk {c}'s input after its forward"),
            (CommOp.SEND_ACT, f, ">", "send of chunk {c}'s output before its forward"),
            (CommOp.RECV_GRAD, b, "<", "receive of chunk {c}'s output gradient after its backward"),
            (CommOp.SEND_GRAD, b, ">", "send of chunk {c}'s input gradient before its backward"),
        ]
        for op, anchor, side, rule in rules:
            if op in expected:
                i = at[(op, c)]
                if (i > anchor) if side == "<" else (i < anchor):
                    raise PlanError(f"stage {s}, action {i} ({acts[i]}): " + rule.format(c=c))


def _ends(s: int, pp: int) -> str:
    if pp == 1:
        return "is the only stage"
    return "is the first stage" if s == 0 else "is the last stage"


def _check_channels(stages: Sequence[Sequence[PipeAction]]) -> None:
    sends: dict[Channel, list[tuple[int, int, int, Comm]]] = {}
    recvs: dict[Channel, list[tuple[int, int, int, Comm]]] = {}
    for s, acts in enumerate(stages):
        for i, a in enumerate(acts):
            if isinstance(a, Comm):
                (sends if a.is_send else recvs).setdefault(a.channel(s), []).append((s, i, a.chunk, a))
    for ch in sorted(set(sends) | set(recvs)):
        out, inn = sends.get(ch, []), recvs.get(ch, [])
        for n, (x, y) in enumerate(zip(out, inn)):
            if (x[3].chunk, x[3].tokens) != (y[3].chunk, y[3].tokens):
                raise PlanError(
                    f"channel {ch}: message #{n} is sent as chunk {x[3].chunk} ({x[3].tokens} tokens, stage {x[0]} "
                    f"action {x[1]}) but received as chunk {y[3].chunk} ({y[3].tokens} tokens, stage {y[0]} "
                    f"action {y[1]}): sends and receives of a channel must come in the same order")
        if len(out) != len(inn):
            raise PlanError(f"channel {ch}: {len(out)} sends but {len(inn)} receives")


def _check_progress(lanes: Sequence[Sequence[tuple[int, PipeAction]]], sends: Sends, *, virtual: bool) -> None:
    """Rule 4 on one lane per process: ``(stage or block, action)`` in the order the process runs them."""
    n = len(lanes)
    lane_of = {b: r for r, lane in enumerate(lanes) for b, _ in lane}  # block -> the rank running it
    pc = [0] * n
    posted: dict[Channel, deque[int]] = {}  # async: sent chunks not yet received

    def head(r: int) -> tuple[int, PipeAction] | None:
        return lanes[r][pc[r]] if pc[r] < len(lanes[r]) else None

    moved = True
    while moved:
        moved = False
        for r in range(n):
            while (h := head(r)) is not None:
                s, a = h
                if isinstance(a, Comm):
                    ch = a.channel(s)
                    if sends == "async":
                        if a.is_send:
                            posted.setdefault(ch, deque()).append(a.chunk)
                        elif posted.get(ch):
                            posted[ch].popleft()  # order and sizes matched in _check_channels
                        else:
                            break
                    else:
                        q = lane_of.get(a.peer, -1)
                        peer = head(q) if q != r and q >= 0 else None
                        # the peer rank's head must be the other end of this very channel (its block's view)
                        if not (peer is not None and isinstance(peer[1], Comm) and peer[1].channel(peer[0]) == ch
                                and peer[1].is_send != a.is_send):
                            break
                        pc[q] += 1  # rendezvous: both ends complete together
                pc[r] += 1
                moved = True
    if any(head(r) is not None for r in range(n)):
        heads = "; ".join(_stuck(r, pc[r], lanes[r], virtual) for r in range(n))
        raise DeadlockError(f"deadlock with {sends} sends: {heads}")


def _stuck(r: int, pc: int, lane: Sequence[tuple[int, PipeAction]], virtual: bool) -> str:
    who = f"rank {r}" if virtual else f"stage {r}"
    if pc == len(lane):
        return f"{who} finished"
    s, a = lane[pc]
    what = ("waits for its receive on" if a.is_send else "waits for a send on") if isinstance(a, Comm) else "at"
    where = f" channel {a.channel(s)}" if isinstance(a, Comm) else ""
    at = f"order position {pc} (block {s} action {a})" if virtual else f"action {pc} ({a})"
    return f"{who} {what}{where} at {at}"
