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
    """``check_pipeline`` on a plan's lists with its caps; also checks its ``chunk_tokens``."""
    tokens = tuple(sum(seg.length for seg in chunk) for chunk in chunks)
    if plan.chunk_tokens != tokens:
        raise PlanError(f"plan.chunk_tokens {plan.chunk_tokens} differ from the chunks' token counts {tokens}")
    check_pipeline(plan.stages, chunks, seq_lens, plan.caps, sends=sends)


def check_pipeline(
    stages: Sequence[Sequence[PipeAction]],
    chunks: Sequence[Sequence[Segment]],
    seq_lens: Sequence[int],
    caps: Sequence[int],
    *,
    sends: Sends = "async",
) -> None:
    """Raise ``PlanError`` (``DeadlockError`` for 4) for the first broken rule; ``None`` if valid."""
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
    _check_progress(stages, sends)


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


def _check_progress(stages: Sequence[Sequence[PipeAction]], sends: Sends) -> None:
    pp = len(stages)
    pc = [0] * pp
    posted: dict[Channel, deque[int]] = {}  # async: sent chunks not yet received

    def head(s: int) -> PipeAction | None:
        return stages[s][pc[s]] if pc[s] < len(stages[s]) else None

    moved = True
    while moved:
        moved = False
        for s in range(pp):
            while (a := head(s)) is not None:
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
                        peer = head(a.peer)
                        if not (isinstance(peer, Comm) and peer.channel(a.peer) == ch and peer.is_send != a.is_send):
                            break
                        pc[a.peer] += 1  # rendezvous: both ends complete together
                pc[s] += 1
                moved = True
    if any(head(s) is not None for s in range(pp)):
        heads = "; ".join(_stuck(s, pc[s], stages[s]) for s in range(pp))
        raise DeadlockError(f"deadlock with {sends} sends: {heads}")


def _stuck(s: int, pc: int, acts: Sequence[PipeAction]) -> str:
    if pc == len(acts):
        return f"stage {s} finished"
    a = acts[pc]
    what = ("waits for its receive on" if a.is_send else "waits for a send on") if isinstance(a, Comm) else "at"
    where = f" channel {a.channel(s)}" if isinstance(a, Comm) else ""
    return f"stage {s} {what}{where} at action {pc} ({a})"
