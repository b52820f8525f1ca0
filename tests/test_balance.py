"""Data-parallel balance: every chunk once, connected chunks on one rank, LPT beats round-robin."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow_pl.data.balance import (
    assign_to_ranks,
    attention_pairs,
    chunk_cost,
    chunk_groups,
    round_robin_assign,
)
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.types import ChunkPlan, Segment


@st.composite
def plans(draw: st.DrawFn) -> tuple[ChunkPlan, int]:
    c = draw(st.integers(1, 32))
    edge = st.sampled_from([0, 1, c, c + 1, 2 * c, 3 * c + 1, 100 * c])
    lengths = draw(st.lists(st.one_of(edge, st.integers(0, 5 * c)), max_size=40))
    return build_chunk_plan(lengths, c), draw(st.integers(1, 9))


def lmsys_like(rng: np.random.Generator, n: int) -> list[int]:
    x = np.exp(rng.normal(np.log(300), 1.3, size=n)).astype(int) + 1
    return np.minimum(x, 300_000).tolist()


def check_assignment(plan: ChunkPlan, dp: int, per_rank: list[list[int]], costs: list[float]) -> None:
    assert len(per_rank) == len(costs) == dp
    flat = sorted(c for r in per_rank for c in r)
    assert flat == list(range(len(plan.chunks)))  # every chunk exactly once, none dropped
    assert all(r == sorted(r) for r in per_rank)  # forward-valid order on each rank
    rank_of = {c: r for r, lst in enumerate(per_rank) for c in lst}
    for chain in plan.chains.values():  # chain and the chunk holding its remainder: one rank
        assert len({rank_of[c] for c in chain}) == 1
    for r, lst in enumerate(per_rank):
        assert costs[r] == pytest.approx(sum(chunk_cost(plan.chunks[c]) for c in lst))


@settings(max_examples=200, deadline=None)
@given(plans())
def test_assignment_invariants(case: tuple[ChunkPlan, int]) -> None:
    plan, dp = case
    got = assign_to_ranks(plan, dp)
    check_assignment(plan, dp, got.per_rank, got.costs)
    mean = sum(got.costs) / dp
    assert got.imbalance == (pytest.approx(max(got.costs) / mean) if mean > 0 else 1.0)
    assert got.num_micro_steps == max(len(r) for r in got.per_rank)
    # the local search never gives back what LPT achieved: max load, then micro-steps
    lpt = assign_to_ranks(plan, dp, search_budget=0)
    check_assignment(plan, dp, lpt.per_rank, lpt.costs)
    assert max(got.costs) <= max(lpt.costs) * (1 + 1e-9) + 1e-12
    assert got.num_micro_steps <= lpt.num_micro_steps
    rr = round_robin_assign(plan, dp)
    check_assignment(plan, dp, rr.per_rank, rr.costs)
    assert assign_to_ranks(plan, dp) == got  # deterministic


def test_dp1_and_empty() -> None:
    plan = build_chunk_plan([5, 30, 2], 8)
    one = assign_to_ranks(plan, 1)
    assert one.per_rank == [list(range(len(plan.chunks)))] and one.imbalance == 1.0
    empty = assign_to_ranks(build_chunk_plan([], 8), 4)
    assert empty.per_rank == [[], [], [], []] and empty.imbalance == 1.0 and empty.num_micro_steps == 0
    with pytest.raises(ValueError):
        assign_to_ranks(plan, 0)


def test_packed_chunk_joins_several_chains() -> None:
    plan = build_chunk_plan([13, 14, 3, 3, 3, 3], 10)  # remainders 3 and 4 of seqs 0, 1 share a chunk
    shared = plan.chains[0][-1]
    assert plan.chains[1][-1] == shared
    groups = chunk_groups(plan)
    big = next(g for g in groups if shared in g)
    assert set(big) == set(plan.chains[0]) | set(plan.chains[1])
    got = assign_to_ranks(plan, 3)
    assert any(set(big) <= set(r) for r in got.per_rank)


def test_chunk_cost_counts_prefix_pairs() -> None:
    seg = Segment(0, 5, 9)  # queries see 6, 7, 8, 9 keys
    assert attention_pairs(seg) == 6 + 7 + 8 + 9
    assert attention_pairs(Segment(0, 0, 3)) == 1 + 2 + 3
    assert chunk_cost([seg, Segment(1, 0, 3)], a_tok=2.0, a_attn=0.5) == 2.0 * 7 + 0.5 * (30 + 6)
    assert chunk_cost([]) == 0.0


def test_lpt_beats_round_robin_on_long_tail() -> None:
    rng = np.random.default_rng(1)
    for dp in (2, 4, 8):
        lpt_total = rr_total = 0.0
        for _ in range(10):
            lengths = lmsys_like(rng, 256)
            lengths[:2] = [60_000, 20_000]
            plan = build_chunk_plan(lengths, 2048)
            lpt, rr = assign_to_ranks(plan, dp), round_robin_assign(plan, dp)
            assert lpt.imbalance <= rr.imbalance + 1e-9
            lpt_total += lpt.imbalance
            rr_total += rr.imbalance
        assert lpt_total < rr_total


def test_equal_counts_when_costs_allow() -> None:
    # eight identical standalone chunks over four ranks: two each, perfectly balanced
    plan = build_chunk_plan([8] * 8, 8)
    got = assign_to_ranks(plan, 4)
    assert got.counts == [2, 2, 2, 2] and got.imbalance == pytest.approx(1.0)
