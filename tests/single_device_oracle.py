"""Test oracle: the single-device chunk schedule (paper Algorithm 2) written the plain way, and its checker.

Production code plans every layout with ``schedule.scheduler.plan_pipeline`` (one device is its
one-stage case, run by ``schedule.runner.StepRunner``). This module keeps the direct formulation as an
independent reference: ``test_pipeline_plan.py`` proves the one-stage pipeline plan equals it, and tests
that drive a ``ChunkExecutor`` by hand use it to get a valid order without the pipeline machinery.

Components (chunks linked by sequence continuation, see ``graph.py``) run one after another: all
forwards of a component, then all its backwards, so at most one component's key/value state is
alive. Inside a component, forwards follow a stable topological order; only the last ``k`` of them
keep their activations. The others run without autograd (only their keys/values are stored) and are
recomputed right before their backward, which runs in exactly the reverse forward order.

One sequence in four chunks ``0 -> 1 -> 2 -> 3`` with ``k = 1``::

    F0(drop) F1(drop) F2(drop) F3 B3 R2 B2 R1 B1 R0 B0      peak live activations: 1

the same with ``k = 2``::

    F0(drop) F1(drop) F2 F3 B3 B2 R1 B1 R0 B0               peak live activations: 2

and a standalone chunk is always ``F4 B4``. With ``k >= `` component size nothing is recomputed.

The checker (``check_plan``) accepts any single-device list, not only this scheduler's: every chunk runs
exactly one FORWARD and one BACKWARD, dependencies are respected, dropped forwards are recomputed once
before their backward, and live activations never exceed ``k``. Live activations of the plan for chain
``0 -> 1 -> 2``, ``k = 1``::

    action   F0(drop)  F1(drop)  F2  B2  R1  B1  R0  B0
    live        0         0       1   0   1   0   1   0       peak 1

Errors name the action index and the rule, e.g.
``action 3 (B0): backward of chunk 0 before the backward of chunk 1 it depends on``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.graph import build_graph, forward_order
from chunkflow_pl.schedule.pipeline_actions import Action, Op
from chunkflow_pl.schedule.pipeline_checker import PlanError, check_counts, replay_compute


def plan_single_device(chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int], k: int) -> list[Action]:
    """Ordered actions for one step on one device, keeping at most ``k`` chunks' activations alive.

    Raises ``ValueError`` when ``k < 1`` or when ``chunks`` do not tile their sequences (see
    ``build_graph``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (chunks whose activations are kept), got {k}")
    graph = build_graph(chunks, seq_lens)
    actions: list[Action] = []
    for members in graph.components:
        order = forward_order(graph, members)
        # The last k forwards are the first k backwards: keeping exactly those means they never
        # need a recompute, and no more than k are alive when the first backward starts.
        first_kept = max(0, len(order) - k)
        actions.extend(Action(Op.FORWARD, c, keep=i >= first_kept) for i, c in enumerate(order))
        for i in reversed(range(len(order))):
            c = order[i]
            if i < first_kept:
                # Recompute just in time: its activations live only across its own backward.
                actions.append(Action(Op.RECOMPUTE, c))
            actions.append(Action(Op.BACKWARD, c))
    return actions


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
