"""State-aware chunk scheduling on one device (paper Algorithm 2).

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
"""

from __future__ import annotations

from collections.abc import Sequence

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.actions import Action, Op
from chunkflow_pl.schedule.graph import build_graph, forward_order


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
