"""Virtual stages and split backward together: ``plan_pipeline(..., virtual=v, split_backward=True)``.

A ``W`` goes through the rank layer like every other action (``_emit``: it lands in its rank's merged order),
and a rank runs its oldest pending ``W`` (of any of its blocks) when it would otherwise idle. The checker and
the simulator then see ordinary plans: per-block rules (one ``W`` per split ``B``, later, caps counted until
the ``W``) and one clock per rank.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline_plan import Chunks, replicas
from test_virtual_plan import _v1_cases

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.pipeline_actions import Action, Op
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline
from chunkflow_pl.schedule.simulator import lower_bound, simulate


@settings(max_examples=60, deadline=None)
@given(replicas(), st.integers(2, 4), st.integers(1, 2), st.sampled_from([2, 2, 3]), st.sampled_from([1, 2, None]),
       st.sampled_from([0.0, 0.02]), st.sampled_from([0.0, 0.3]))
def test_scheduler_gives_valid_virtual_split_plans(case: tuple[Chunks, list[int]], pp: int, k: int, v: int,
                                                   max_open: int | None, per_pair: float, latency: float) -> None:
    chunks, lens = case
    cost = CostModel.uniform(pp * v, per_token=0.1, per_pair=per_pair, comm_latency=latency)
    plan = plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, virtual=v, split_backward=True)
    check_pipeline_plan(plan, chunks, lens)  # per-block W rules, rank order, progress on the merged orders
    check_pipeline_plan(plan, chunks, lens, sends="async")
    again = plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, virtual=v, split_backward=True)
    assert plan == again and plan.fingerprint() == again.fingerprint()  # deterministic
    assert (plan.pp, plan.ranks, plan.virtual, plan.caps) == (pp * v, pp, v, default_caps(pp * v, k))

    real = [c for c, ch in enumerate(chunks) if ch]
    for b in range(pp * v):
        acts = plan.compute(b)
        assert all(a.split for a in acts if a.op is Op.BACKWARD)
        assert sorted(a.chunk for a in acts if a.op is Op.WEIGHT) == real
    for r in range(pp):  # every W sits in its own rank's order, after its B
        mine = [(b, a) for b, a in plan.rank_actions(r) if isinstance(a, Action)]
        assert {b for b, _ in mine} <= {b for b in range(pp * v) if b % pp == r}
        seen_b = set()
        for b, a in mine:
            if a.op is Op.BACKWARD:
                seen_b.add((b, a.chunk))
            elif a.op is Op.WEIGHT:
                assert (b, a.chunk) in seen_b

    result = simulate(plan, chunks, lens, cost)
    assert len(result.bubble) == pp and len(result.peak_live) == pp * v
    assert all(p <= cap for p, cap in zip(result.peak_live, plan.caps))  # W-pending chunks count against the cap
    for r in range(pp):  # a rank is one resource: its compute never overlaps, W included
        mine = [e for e in result.events if e.stage == r]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))
    assert [b % pp for b in result.event_blocks] == [e.stage for e in result.events]
    busiest, path = lower_bound(plan, chunks, lens, cost)
    assert result.step_time >= max(busiest, path) - 1e-9
    assert busiest == pytest.approx(max(result.busy))


def uniform(p: int, m: int, v: int, split: bool) -> float:
    """Step time of m equal standalone chunks: per stage forward 1, backward 2 (B(in) 1 + W 1), free messages."""
    chunks, lens = [[Segment(i, 0, 4)] for i in range(m)], [4] * m
    cost = CostModel.uniform(p * v, per_token=1.0 / (4 * v), per_pair=0.0)  # a block is 1/v of a stage
    plan = plan_pipeline(chunks, lens, p, 1, cost=cost, virtual=v, split_backward=split)
    check_pipeline_plan(plan, chunks, lens)
    return simulate(plan, chunks, lens, cost).step_time


@pytest.mark.parametrize(("p", "m", "times"), [
    (2, 4, (15.0, 14.0, 13.5, 12.5)),
    (4, 8, (33.0, 30.0, 28.5, 26.5)),
    (8, 16, (69.0, 62.0, 60.5, 56.5)),
    (3, 5, (21.0, 19.0, 19.0, 17.0)),
])
def test_each_feature_shortens_the_step_and_both_together_most(p: int, m: int, times: tuple[float, ...]) -> None:
    """Step times (v=1, v=1 split, v=2, v=2 split): the Ws fill the interleaved pipeline's idle slots too."""
    got = (uniform(p, m, 1, False), uniform(p, m, 1, True), uniform(p, m, 2, False), uniform(p, m, 2, True))
    assert got == times
    assert got[3] < min(got[:3])


def test_a_rank_runs_its_oldest_pending_w_first_across_blocks() -> None:
    """Rank 0 holds blocks 0 and 2; its Ws run in the order their B(in)s ran, whichever block they belong to."""
    chunks, lens = [[Segment(i, 0, 4)] for i in range(6)], [4] * 6
    cost = CostModel.uniform(4, per_token=0.25, per_pair=0.0)
    plan = plan_pipeline(chunks, lens, 2, 1, cost=cost, virtual=2, split_backward=True)
    for r in range(2):
        acts = [(b, a) for b, a in plan.rank_actions(r) if isinstance(a, Action)]
        b_order = [(b, a.chunk) for b, a in acts if a.op is Op.BACKWARD]
        w_order = [(b, a.chunk) for b, a in acts if a.op is Op.WEIGHT]
        assert w_order == b_order


# Digest of split_backward=True plans (v = 1) at commit 3c6672b, branch splitplan before the merge with virtual
# stages, for the cases below: the rank layer must not change a one-block-per-rank split plan.
V1_SPLIT_DIGEST = "e40fb9e51e44928d"


def test_v1_split_plans_are_byte_identical_to_the_split_branch() -> None:
    digest = hashlib.sha256()
    for chunks, lengths, pp, k, cost, open_chains in _v1_cases(25):
        plan = plan_pipeline(chunks, lengths, pp, k, cost=cost, max_open_chains=open_chains, split_backward=True)
        assert plan.order is None and plan.virtual == 1
        digest.update(f"{plan.text()}\n{plan.fingerprint()}\n".encode())
    assert digest.hexdigest()[:16] == V1_SPLIT_DIGEST
