"""Data-parallel balance: give every rank a similar amount of work for one global batch.

Cost of a chunk (``ChunkCost``) = linear work per token + attention work per (query, key) pair, prefix
included, on each pipeline stage of a replica. A segment ``[start, end)`` of ``n`` tokens has query ``i``
seeing ``start + i + 1`` keys (``utils/pairs.py``)::

    keys ->   prefix (start)   own keys
    query 0   ##########       #
    query 1   ##########       ##           pairs = n * start + n (n + 1) / 2
    query 2   ##########       ###

The coefficients come from the model being trained: ``schedule.cost.CostModel.balance_cost()`` builds
them from the model's FLOPs per stage (the data layer knows no model). The ratio pair/token is what
matters, and it moves with the model's shape: ~1/(6 D) for hidden size ``D`` (0.5B: 896, 72B: 8192),
less where the MLP is wide or the LM head large. With pipeline stages, a chunk costs its slowest stage
(a pipeline advances at that pace); a dropped chunk's recompute is not counted (which chunks drop
depends on the schedule, not on the assignment's balance).

Chunks that share a sequence must stay on one rank (they pass prefix state to each other), and a
packed chunk may hold the remainders of several chains, so the unit of assignment is a connected
*group* (union-find over chains)::

    chain of seq 3: c0 c1 -> c4 (c4 also holds the remainder of seq 5, chain c2 c3 -> c4)
    groups: {c0 c1 c2 c3 c4}, {c5}, {c6}, ...

Groups go to ranks by LPT (largest cost first, onto the least loaded rank), then a short local search
of moves and swaps off the bottleneck rank. The objective, compared lexicographically, is: do not
exceed LPT's max load (times ``1 + count_slack``), then fewest micro-steps (the longest rank's chunk
count: shorter ranks are padded with empty chunks by the caller), then lowest max load, then most
even loads. No chunk is ever dropped; each rank's chunks stay in increasing index order, which
``packing`` guarantees to be a valid forward order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from chunkflow_pl.data.types import ChunkPlan, Segment
from chunkflow_pl.utils.pairs import causal_pairs
from chunkflow_pl.utils.unionfind import connected_groups

# Fallback pair/token weight where no model is known (statistics, tests): a fixed 7B-class ratio,
# 1 / (6 * 4096). Training passes the model's own (``ChunkFlowDataModule(chunk_cost=...)``).
DEFAULT_A_ATTN = 1.0 / 24576
# ~1 us per scored candidate: at most a few ms per global batch, whatever dp and the batch size
DEFAULT_SEARCH_BUDGET = 2000

CostFn = Callable[[Sequence[Segment]], float]


def attention_pairs(seg: Segment) -> int:
    """Causal (query, key) pairs of a segment that attends to its prefix ``[0, start)``."""
    return causal_pairs(seg.length, seg.start)


def chunk_cost(segments: Sequence[Segment], a_tok: float = 1.0, a_attn: float = DEFAULT_A_ATTN) -> float:
    """``a_tok * tokens + a_attn * attention pairs`` over the chunk's segments (empty chunk: 0)."""
    return sum(a_tok * seg.length + a_attn * attention_pairs(seg) for seg in segments)


@dataclass(frozen=True)
class ChunkCost:
    """What one chunk costs a data-parallel replica, from per-stage coefficients (see module docstring).

    Stage ``s`` runs a chunk in ``per_token[s] * tokens + per_pair[s] * pairs`` (any unit: only ratios
    matter); the chunk costs its slowest stage. Frozen and plain numbers, so every rank and loader worker
    holds the same one and derives the same assignment.
    """

    per_token: tuple[float, ...]  # by pipeline stage
    per_pair: tuple[float, ...]  # by pipeline stage

    def __post_init__(self) -> None:
        if not self.per_token or len(self.per_token) != len(self.per_pair):
            raise ValueError(f"per_token ({len(self.per_token)}) and per_pair ({len(self.per_pair)}) need one entry "
                             "per pipeline stage")
        if min(self.per_token) <= 0 or min(self.per_pair) < 0:
            raise ValueError(f"per_token {self.per_token} must be > 0 and per_pair {self.per_pair} >= 0")

    def stage_costs(self, segments: Sequence[Segment]) -> tuple[float, ...]:
        return tuple(chunk_cost(segments, t, p) for t, p in zip(self.per_token, self.per_pair, strict=True))

    def __call__(self, segments: Sequence[Segment]) -> float:
        if len(self.per_token) == 1:
            return chunk_cost(segments, self.per_token[0], self.per_pair[0])
        return max(self.stage_costs(segments))


DEFAULT_CHUNK_COST = ChunkCost(per_token=(1.0,), per_pair=(DEFAULT_A_ATTN,))


@dataclass
class RankAssignment:
    """``per_rank[r]`` = chunk indices of rank ``r`` in increasing (forward-valid) order."""

    per_rank: list[list[int]]
    costs: list[float]

    @property
    def imbalance(self) -> float:
        """max / mean rank cost; 1.0 when there is no work at all."""
        mean = sum(self.costs) / len(self.costs) if self.costs else 0.0
        return max(self.costs) / mean if mean > 0 else 1.0

    @property
    def num_micro_steps(self) -> int:
        """Chunks every rank must run (ranks with fewer are padded with empty chunks)."""
        return max((len(r) for r in self.per_rank), default=0)

    @property
    def counts(self) -> list[int]:
        return [len(r) for r in self.per_rank]


def chunk_groups(plan: ChunkPlan) -> list[list[int]]:
    """Connected components of chunks linked by chains, each sorted, ordered by first chunk."""
    links = ((chain[0], c) for chain in plan.chains.values() for c in chain[1:])
    return connected_groups(len(plan.chunks), links)


def _result(plan_costs: list[float], groups: list[list[int]], rank_of: list[int], dp: int) -> RankAssignment:
    per_rank: list[list[int]] = [[] for _ in range(dp)]
    for g, r in zip(groups, rank_of, strict=True):
        per_rank[r].extend(g)
    for lst in per_rank:
        lst.sort()
    costs = [sum(plan_costs[c] for c in lst) for lst in per_rank]
    return RankAssignment(per_rank=per_rank, costs=costs)


def round_robin_assign(plan: ChunkPlan, dp: int, cost_fn: CostFn = DEFAULT_CHUNK_COST) -> RankAssignment:
    """Baseline: groups dealt to ranks in index order, ignoring cost."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    groups = chunk_groups(plan)
    return _result([cost_fn(c) for c in plan.chunks], groups, [i % dp for i in range(len(groups))], dp)


def assign_to_ranks(
    plan: ChunkPlan,
    dp: int,
    cost_fn: CostFn = DEFAULT_CHUNK_COST,
    count_slack: float = 0.0,
    search_budget: int | None = None,
) -> RankAssignment:
    """Assign every chunk to one of ``dp`` ranks, whole groups at a time (see module docstring).

    ``count_slack``: relative max-load increase over LPT accepted to reduce the micro-step count.
    ``search_budget``: candidate moves the local search may score (0 = plain LPT); bounds its time.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    chunk_costs = [float(cost_fn(c)) for c in plan.chunks]
    groups = chunk_groups(plan)
    if dp == 1:
        return _result(chunk_costs, groups, [0] * len(groups), 1)
    g_cost = [sum(chunk_costs[c] for c in g) for g in groups]
    g_count = [len(g) for g in groups]

    # LPT: biggest group first onto the least loaded rank (fewer chunks, then lower rank on ties)
    heap = [(0.0, 0, r) for r in range(dp)]  # (load, chunk count, rank)
    rank_of = [0] * len(groups)
    for g in sorted(range(len(groups)), key=lambda g: (-g_cost[g], -g_count[g], g)):
        load, count, r = heapq.heappop(heap)
        rank_of[g] = r
        heapq.heappush(heap, (load + g_cost[g], count + g_count[g], r))
    lpt_max = max(load for load, _, _ in heap)

    budget = DEFAULT_SEARCH_BUDGET if search_budget is None else search_budget
    _local_search(g_cost, g_count, rank_of, dp, lpt_max * (1.0 + count_slack), budget)
    return _result(chunk_costs, groups, rank_of, dp)


def _max_except(top3: list[tuple[float, int]], a: int, b: int) -> float:
    """Largest value among ranks other than ``a`` and ``b`` (``top3`` = 3 largest, descending)."""
    for v, r in top3:
        if r != a and r != b:
            return v
    return float("-inf")


def _local_search(
    g_cost: list[float], g_count: list[int], rank_of: list[int], dp: int, cap: float, budget: int
) -> None:
    """First-improvement moves/swaps of groups off bottleneck ranks; edits ``rank_of`` in place.

    Each candidate is scored in O(1) from the three largest loads/counts; at most ``budget`` are
    scored in all, so the time is bounded whatever the batch size and ``dp``.
    """
    loads = [0.0] * dp
    counts = [0] * dp
    members: list[list[int]] = [[] for _ in range(dp)]
    for g, r in enumerate(rank_of):
        loads[r] += g_cost[g]
        counts[r] += g_count[g]
        members[r].append(g)
    scale = max(sum(loads), 1e-300)
    eps = 1e-12 * scale
    Key = tuple[float, int, float, float]

    def better(x: Key, y: Key) -> bool:
        # tolerance on the float parts so rounding noise never counts as progress (no cycling)
        if abs(x[0] - y[0]) > eps:
            return x[0] < y[0]
        if x[1] != y[1]:
            return x[1] < y[1]
        if abs(x[2] - y[2]) > eps:
            return x[2] < y[2]
        return x[3] < y[3] - eps

    def candidates() -> Iterator[tuple[int, int, int, int | None, float, int]]:
        """(a, b, g, h, d_cost, d_count): move group g from bottleneck a to b, or swap it with h."""
        top_load, top_count = max(loads), max(counts)
        sources = [r for r in range(dp) if loads[r] >= top_load - eps or counts[r] == top_count]
        for a in sources:
            for g in sorted(members[a], key=lambda g: (-g_cost[g], g)):
                for b in range(dp):
                    if b == a:
                        continue
                    for h in [None, *members[b]]:
                        dc = g_cost[g] - (g_cost[h] if h is not None else 0.0)
                        dn = g_count[g] - (g_count[h] if h is not None else 0)
                        if dc > 0 or dn > 0:  # otherwise nothing leaves the bottleneck
                            yield a, b, g, h, dc, dn

    sumsq = sum(x * x for x in loads) / scale
    current: Key = (max(max(loads), cap), max(counts), max(loads), sumsq)
    while True:
        load3 = sorted(((v, r) for r, v in enumerate(loads)), reverse=True)[:3]
        count3 = sorted(((float(v), r) for r, v in enumerate(counts)), reverse=True)[:3]
        for move in candidates():
            a, b, _, _, dc, dn = move
            if budget <= 0:
                return
            budget -= 1
            la, lb = loads[a] - dc, loads[b] + dc
            new_top = max(_max_except(load3, a, b), la, lb)
            new_count = int(max(_max_except(count3, a, b), counts[a] - dn, counts[b] + dn))
            new_sq = sumsq + (la * la + lb * lb - loads[a] ** 2 - loads[b] ** 2) / scale
            cand: Key = (max(new_top, cap), new_count, new_top, new_sq)
            if better(cand, current):
                break
        else:
            return  # local optimum: no candidate improves
        a, b, g, h, dc, dn = move
        current, sumsq = cand, new_sq
        loads[a], loads[b] = la, lb
        counts[a] -= dn
        counts[b] += dn
        members[a].remove(g)
        members[b].append(g)
        rank_of[g] = b
        if h is not None:
            members[b].remove(h)
            members[a].append(h)
            rank_of[h] = a
