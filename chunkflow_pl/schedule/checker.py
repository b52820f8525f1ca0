"""Checker for single-device step plans: any action list, not only the planner's.

A plan is valid when every chunk runs exactly one FORWARD and one BACKWARD, dependencies (see
``graph.py``) are respected, dropped forwards are recomputed once before their backward, and live
activations never exceed ``k``. Live activations of the plan for chain ``0 -> 1 -> 2``, ``k = 1``::

    action   F0(drop)  F1(drop)  F2  B2  R1  B1  R0  B0
    live        0         0       1   0   1   0   1   0       peak 1

Errors name the action index and the rule, e.g.
``action 3 (B0): backward of chunk 0 before the backward of chunk 1 it depends on``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.actions import Action, Op
from chunkflow_pl.schedule.graph import ChunkGraph, build_graph


class PlanError(ValueError):
    """A step plan breaks a scheduling rule."""


def peak_live_activations(actions: Sequence[Action]) -> int:
    """Most chunks holding activations at once: kept forwards and recomputes until their backward."""
    live: Counter[int] = Counter()
    peak = 0
    for a in actions:
        if (a.op is Op.FORWARD and a.keep) or a.op is Op.RECOMPUTE:
            live[a.chunk] += 1
        elif a.op is Op.BACKWARD:
            live.pop(a.chunk, None)  # backward frees the chunk's activations, however many
        peak = max(peak, sum(live.values()))
    return peak


def check_plan(
    actions: Sequence[Action], chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int], k: int
) -> None:
    """Raise ``PlanError`` for the first broken rule; return ``None`` for a valid plan."""
    if k < 1:
        raise PlanError(f"k must be >= 1, got {k}")
    graph = build_graph(chunks, seq_lens)
    indexed = list(enumerate(actions))
    check_counts(indexed, graph.num_chunks, range(graph.num_chunks))
    replay_compute(indexed, graph, k)


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
        else:
            if c not in kept:
                raise fail(f"backward of chunk {c} before its own forward")
            for m in sorted(graph.bwd_deps[c]):
                if m not in backed:
                    raise fail(f"backward of chunk {c} before the backward of chunk {m} it depends on")
            if not kept[c] and c not in recomputed:
                raise fail(f"backward of chunk {c} without a recompute of its dropped forward")
            backed.add(c)
            live.discard(c)
        if len(live) > cap:
            raise fail(f"live activations {len(live)} exceed {cap_name}={cap} (chunks {sorted(live)})")
        peak = max(peak, len(live))
    return peak


def check_counts(indexed: Sequence[tuple[int, Action]], n: int, required: Iterable[int], *, where: str = "") -> None:
    """Exactly one FORWARD and one BACKWARD of every chunk in ``required``, none of any other chunk.

    Counted before replaying the order, so a missing action reads as missing rather than as a
    dependency broken later by the chunk that needed it.
    """
    need = set(required)
    seen: dict[Op, set[int]] = {Op.FORWARD: set(), Op.BACKWARD: set()}
    for i, a in indexed:
        if not 0 <= a.chunk < n:
            raise PlanError(f"{where}action {i} ({a}): chunk index {a.chunk} out of range [0, {n})")
        if a.chunk not in need:
            raise PlanError(f"{where}action {i} ({a}): chunk {a.chunk} has no tokens, so no action may name it")
        if a.op in seen:
            if a.chunk in seen[a.op]:
                raise PlanError(f"{where}action {i} ({a}): duplicate {a.op.name} of chunk {a.chunk}")
            seen[a.op].add(a.chunk)
    for op, done in seen.items():
        missing = sorted(need - done)
        if missing:
            raise PlanError(f"{where}missing {op.name} of chunks {missing}")
