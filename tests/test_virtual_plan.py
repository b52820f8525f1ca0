"""Virtual stages (interleaved 1F1B) at the plan level: scheduler, checker and simulator (pure python, no torch)."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pipeline_plan import Chunks, parse_stages, replicas

from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.graph import build_graph
from chunkflow_pl.schedule.pipeline_actions import Action, Comm, CommOp, Op, PipelinePlan
from chunkflow_pl.schedule.pipeline_checker import DeadlockError, PlanError, check_pipeline_plan
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline
from chunkflow_pl.schedule.simulator import lower_bound, simulate
from chunkflow_pl.schedule.timeline import ascii_timeline


def block_cost(blocks: int, tokens_per_unit: int = 4) -> CostModel:
    """Per block: forward 1, backward 2, recompute 1 per chunk of ``tokens_per_unit`` tokens; free messages."""
    return CostModel.uniform(blocks, per_token=1.0 / tokens_per_unit, per_pair=0.0)


def order_text(plan: PipelinePlan) -> str:
    """Each rank's compute actions in execution order, ``F0/2`` = chunk 0's forward on block 2."""
    return "\n".join(f"rank {r}: " + " ".join(f"{a}/{b}" for b, a in plan.rank_actions(r) if isinstance(a, Action))
                     for r in range(plan.ranks))


def rank_chart(plan: PipelinePlan, chunks: Chunks, lens: list[int], cost: CostModel) -> str:
    text = ascii_timeline(simulate(plan, chunks, lens, cost).events, plan.ranks)
    return re.sub(r"(?m)^stage (\d+) ", lambda m: f"rank {m[1]:<3}", text)


FOUR: Chunks = [[Segment(i, 0, 4)] for i in range(4)]  # four standalone chunks of one time unit per block
FOUR_LENS = [4] * 4


def test_docstring_example_is_what_the_scheduler_gives() -> None:
    from chunkflow_pl.schedule import scheduler

    plan = plan_pipeline(FOUR, FOUR_LENS, pp=2, k=1, cost=block_cost(4), virtual=2)
    check_pipeline_plan(plan, FOUR, FOUR_LENS)
    assert (plan.virtual, plan.ranks, plan.caps) == (2, 2, (4, 3, 2, 1))
    doc = scheduler.__doc__
    for line in (plan.text() + "\n" + order_text(plan) + "\n" + rank_chart(plan, FOUR, FOUR_LENS, block_cost(4))
                 ).splitlines():
        assert f"    {line}\n" in doc, line
    r2 = simulate(plan, FOUR, FOUR_LENS, block_cost(4))
    one = plan_pipeline(FOUR, FOUR_LENS, pp=2, k=1, cost=block_cost(2, tokens_per_unit=2))
    r1 = simulate(one, FOUR, FOUR_LENS, block_cost(2, tokens_per_unit=2))
    assert (r2.step_time, r2.bubble, r1.step_time, r1.bubble_total) == (27.0, (3 / 27, 3 / 27), 30.0, 6 / 30)


# Digest of plan_pipeline's plans at commit fe4dbc6 (before virtual stages) for the cases of _v1_cases().
V1_DIGEST = "fdef21b6b40b4276"


def _v1_cases(seed: int = 24):
    """Random (chunks, lengths, pp, k, cost, max_open_chains) of one data-parallel rank; the same for one seed."""
    rng = random.Random(seed)
    for _ in range(150):
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(1, 200)]) for _ in range(rng.randint(1, 24))]
        chunk_plan = build_chunk_plan(lengths, rng.randint(4, 48))
        assignment = assign_to_ranks(chunk_plan, rng.randint(1, 3))
        mine = [chunk_plan.chunks[c] for c in assignment.per_rank[0]]
        chunks = mine + [[] for _ in range(assignment.num_micro_steps - len(mine))]
        pp, k = rng.randint(1, 8), rng.randint(1, 3)
        cost = CostModel.uniform(pp, per_token=0.1, per_pair=rng.choice([0.0, 0.02]),
                                 comm_latency=rng.choice([0.0, 0.3]))
        yield chunks, lengths, pp, k, cost, rng.choice([1, 2, None])


def test_virtual_1_plans_are_byte_identical_to_before() -> None:
    digest = hashlib.sha256()
    for chunks, lengths, pp, k, cost, max_open in _v1_cases():
        plan = plan_pipeline(chunks, lengths, pp, k, cost=cost, max_open_chains=max_open)
        assert plan == plan_pipeline(chunks, lengths, pp, k, cost=cost, max_open_chains=max_open, virtual=1)
        assert plan.order is None and plan.virtual == 1
        digest.update(f"{plan.text()}\n{plan.fingerprint()}\n".encode())
    assert digest.hexdigest()[:16] == V1_DIGEST


def megatron_bubble(p: int, m: int, v: int) -> float:
    return (p - 1) / (v * m + p - 1)


@pytest.mark.parametrize(("p", "m"), [(2, 4), (2, 8), (2, 16), (2, 32), (4, 4), (4, 8), (4, 16), (4, 32), (8, 8),
                                      (8, 32)])
def test_uniform_micro_batches_give_the_interleaved_1f1b_bubble(p: int, m: int) -> None:
    chunks = [[Segment(i, 0, 4)] for i in range(m)]
    cost = CostModel.uniform(2 * p, per_token=1.0 / 8, per_pair=0.0)  # a block is half a stage
    plan = plan_pipeline(chunks, [4] * m, p, k=1, cost=cost, virtual=2)
    check_pipeline_plan(plan, chunks, [4] * m)
    result = simulate(plan, chunks, [4] * m, cost)
    assert result.bubble_total == pytest.approx(megatron_bubble(p, m, 2), abs=1e-12)
    assert result.bubble_total < megatron_bubble(p, m, 1)  # what v = 1 gives (test_pipeline_plan.py)


@pytest.mark.parametrize(("p", "m"), [(8, 4), (8, 16), (3, 5), (5, 7)])
def test_interleaving_never_loses_to_v1_on_uniform_micro_batches(p: int, m: int) -> None:
    chunks = [[Segment(i, 0, 4)] for i in range(m)]
    r2 = simulate(plan_pipeline(chunks, [4] * m, p, 1, cost=CostModel.uniform(2 * p, 1 / 8, 0.0), virtual=2),
                  chunks, [4] * m, CostModel.uniform(2 * p, 1 / 8, 0.0))
    r1 = simulate(plan_pipeline(chunks, [4] * m, p, 1, cost=CostModel.uniform(p, 1 / 4, 0.0)),
                  chunks, [4] * m, CostModel.uniform(p, 1 / 4, 0.0))
    assert r2.step_time < r1.step_time


@settings(max_examples=60, deadline=None)
@given(replicas(), st.integers(2, 4), st.integers(1, 2), st.sampled_from([2, 2, 3]), st.sampled_from([1, 2, None]),
       st.sampled_from([0.0, 0.02]), st.sampled_from([0.0, 0.3]))
def test_scheduler_gives_valid_virtual_plans(case: tuple[Chunks, list[int]], pp: int, k: int, v: int,
                                             max_open: int | None, per_pair: float, latency: float) -> None:
    chunks, lens = case
    cost = CostModel.uniform(pp * v, per_token=0.1, per_pair=per_pair, comm_latency=latency)
    plan = plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, virtual=v)
    check_pipeline_plan(plan, chunks, lens)
    assert plan == plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, virtual=v)  # deterministic
    assert (plan.pp, plan.ranks, plan.virtual, plan.caps) == (pp * v, pp, v, default_caps(pp * v, k))
    for r in range(pp):
        assert {b for b, _ in plan.rank_actions(r)} <= {b for b in range(pp * v) if b % pp == r}
    forwards = [[a.chunk for a in plan.compute(b) if a.op is Op.FORWARD] for b in range(pp * v)]
    assert all(f == forwards[0] for f in forwards)  # one forward order over all blocks (FIFO channels)
    assert sorted(forwards[0]) == [c for c, ch in enumerate(chunks) if ch]

    result = simulate(plan, chunks, lens, cost)
    assert len(result.bubble) == pp and len(result.peak_live) == pp * v
    assert all(p <= cap for p, cap in zip(result.peak_live, plan.caps))
    for r in range(pp):  # a rank is one resource: its compute never overlaps
        mine = [e for e in result.events if e.stage == r]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))
    assert [b % pp for b in result.event_blocks] == [e.stage for e in result.events]
    busiest, path = lower_bound(plan, chunks, lens, cost)
    assert result.step_time >= max(busiest, path) - 1e-9
    assert busiest == pytest.approx(max(result.busy))  # the busiest *rank*: its blocks' work together


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pp=2, k=1, virtual=0), re.escape("virtual must be >= 1 (layer blocks per rank; 1: no interleaving), "
                                               "got 0")),
        (dict(pp=1, k=1, virtual=2), re.escape("virtual=2 needs pp >= 2 ranks (interleaving hands blocks from rank "
                                               "to rank), got pp=1; use virtual=1")),
        (dict(pp=2, k=1, virtual=2, cost=CostModel.uniform(2)),
         re.escape("cost model has 2 stages, the plan 4 blocks (pp=2 x virtual=2)")),
        (dict(pp=2, k=1, virtual=2, caps=(2, 1)), re.escape("caps (2, 1) must give each of the 4 stages")),
    ],
)
def test_scheduler_rejects_bad_virtual_arguments(kwargs: dict, match: str) -> None:
    kwargs.setdefault("cost", block_cost(kwargs["pp"] * max(kwargs["virtual"], 1)))
    with pytest.raises(ValueError, match=match):
        plan_pipeline(FOUR, FOUR_LENS, **kwargs)


# -- checker: hand-made virtual plans ---------------------------------------------------------------

ONE: Chunks = [[Segment(0, 0, 4)]]
ONE_BLOCKS = ["F0 >A0 <G0 B0", "<A0 F0 >A0 <G0 B0 >G0", "<A0 F0 >A0 <G0 B0 >G0", "<A0 F0 B0 >G0"]


def one_plan(order: list[list[tuple[int, int]]] | None, virtual: int = 2) -> PipelinePlan:
    stages = tuple(map(tuple, parse_stages(ONE_BLOCKS, ONE)))
    return PipelinePlan(stages, (4, 3, 2, 1), (4,), virtual=virtual,
                        order=None if order is None else tuple(map(tuple, order)))


def seq(block: int, *idx: int) -> list[tuple[int, int]]:
    return [(block, i) for i in idx]


# Rank 0 forwards through block 0 and block 2 before waiting for block 0's gradient: it finishes.
GOOD_ORDER = [seq(0, 0, 1) + seq(2, 0, 1, 2) + seq(2, 3, 4, 5) + seq(0, 2, 3),
              seq(1, 0, 1, 2) + seq(3, 0, 1, 2, 3) + seq(1, 3, 4, 5)]


def test_checker_accepts_the_virtual_plan_the_mutations_below_break() -> None:
    check_pipeline_plan(one_plan(GOOD_ORDER), ONE, [4])
    assert [b for b, _ in one_plan(GOOD_ORDER).rank_actions(0)] == [0, 0, 2, 2, 2, 2, 2, 2, 0, 0]


def test_blocking_sends_hang_across_ranks_where_async_sends_finish() -> None:
    plan = plan_pipeline(FOUR, FOUR_LENS, pp=2, k=1, cost=block_cost(4), virtual=2)
    check_pipeline_plan(plan, FOUR, FOUR_LENS, sends="async")
    # rank 1 posts block 1's output to block 2 while rank 0 is still in block 0's send to block 1
    with pytest.raises(DeadlockError, match=re.escape(
            "deadlock with blocking sends: rank 0 waits for its receive on channel act 0->1 at order position 3 "
            "(block 0 action >A1); rank 1 waits for its receive on channel act 1->2 at order position 2 "
            "(block 1 action >A0)")):
        check_pipeline_plan(plan, FOUR, FOUR_LENS, sends="blocking")
    check_pipeline_plan(one_plan(GOOD_ORDER), ONE, [4], sends="blocking")  # one chunk: every send meets its receive


def test_checker_rejects_a_merged_order_that_deadlocks() -> None:
    # Every block's list is the one GOOD_ORDER runs, but rank 0 now waits in block 0 for the gradient before it
    # runs block 2's forward, which that gradient needs: each list alone is fine, the merge hangs.
    bad = [seq(0, 0, 1, 2, 3) + seq(2, 0, 1, 2, 3, 4, 5), GOOD_ORDER[1]]
    with pytest.raises(DeadlockError, match=re.escape(
            "deadlock with async sends: rank 0 waits for a send on channel grad 1->0 at order position 2 "
            "(block 0 action <G0); rank 1 waits for a send on channel act 2->3 at order position 3 "
            "(block 3 action <A0)")):
        check_pipeline_plan(one_plan(bad), ONE, [4])


@pytest.mark.parametrize(
    ("order", "message"),
    [
        # block 2's actions on rank 1 (block b runs on rank b % 2)
        ([seq(0, 0, 1, 2, 3), GOOD_ORDER[1][:3] + seq(2, 0, 1, 2, 3, 4, 5) + GOOD_ORDER[1][3:]],
         "rank 1, order position 3 (block 2, index 0): block 2 runs on rank 0 (block b on rank b % 2), not 1"),
        # block 2's list out of its own order (its backward before its forward)
        ([seq(0, 0, 1) + seq(2, 3, 4, 5, 0, 1, 2) + seq(0, 2, 3), GOOD_ORDER[1]],
         "rank 0, order position 2 (block 2, index 3): block 2's list must run in its own order, next is its "
         "action 0 (<A0)"),
        # an action left out
        ([GOOD_ORDER[0][:-1], GOOD_ORDER[1]], "rank 0's order runs 3 of block 0's 4 actions"),
        # an action run twice
        ([GOOD_ORDER[0] + [(0, 3)], GOOD_ORDER[1]],
         "rank 0, order position 10 (block 0, index 3): block 0's list must run in its own order, next is its "
         "action 4 (none: the list is done)"),
        ([GOOD_ORDER[0]], "virtual=2 with 4 blocks needs order: one list per rank (2), got 1 lists"),
        (None, "virtual=2 with 4 blocks needs order: one list per rank (2), got None"),
        ([GOOD_ORDER[0] + [(7, 0)], GOOD_ORDER[1]], "block 7 out of range [0, 4)"),
    ],
)
def test_checker_rejects_bad_rank_orders(order: list[list[tuple[int, int]]] | None, message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        check_pipeline_plan(one_plan(order), ONE, [4])


def test_checker_rejects_virtual_plans_that_cannot_be_laid_out() -> None:
    with pytest.raises(PlanError, match=re.escape("virtual=1 plans carry no order (rank r runs stages[r])")):
        check_pipeline_plan(one_plan(GOOD_ORDER, virtual=1), ONE, [4])
    with pytest.raises(PlanError, match=re.escape("virtual=3: the plan's 4 block lists must be a multiple")):
        check_pipeline_plan(one_plan(GOOD_ORDER, virtual=3), ONE, [4])
    with pytest.raises(PlanError, match=re.escape("virtual=4 on 1 rank: interleaved blocks need pp >= 2 ranks")):
        check_pipeline_plan(one_plan([GOOD_ORDER[0] + GOOD_ORDER[1]], virtual=4), ONE, [4])


def test_checker_applies_the_per_block_rules_to_virtual_plans() -> None:
    plan = one_plan(GOOD_ORDER)
    stages = [list(s) for s in plan.stages]
    stages[1][2] = replace(stages[1][2], peer=0)  # block 1 sends its output back to block 0
    with pytest.raises(PlanError, match=re.escape("stage 1, action 2 (>A0): SEND_ACT must name peer stage 2, not 0")):
        check_pipeline_plan(replace(plan, stages=tuple(map(tuple, stages))), ONE, [4])


def test_checker_catches_every_single_action_removed_from_a_virtual_plan() -> None:
    chunks: Chunks = [[Segment(0, 0, 4)], [Segment(0, 4, 8)], [Segment(1, 0, 4)]]
    lens = [8, 4]
    plan = plan_pipeline(chunks, lens, pp=2, k=1, cost=block_cost(4), virtual=2)
    check_pipeline_plan(plan, chunks, lens)
    graph = build_graph(chunks, lens)
    assert graph.num_chunks == 3
    for b, acts in enumerate(plan.stages):
        for i in range(len(acts)):
            stages = tuple(acts[:i] + acts[i + 1:] if x == b else plan.stages[x] for x in range(plan.pp))
            order = tuple(tuple((y, j - (y == b and j > i)) for y, j in lane if (y, j) != (b, i))
                          for lane in plan.order)
            with pytest.raises(PlanError):
                check_pipeline_plan(replace(plan, stages=stages, order=order), chunks, lens)


def test_checker_rejects_a_gradient_sent_to_the_rank_s_other_block() -> None:
    """Block 2's input gradient belongs to block 1 (rank 1); sent to block 0, which rank 0 also holds, it would
    reach the right rank's process but the wrong block: the per-block message rule names it."""
    plan = one_plan(GOOD_ORDER)
    stages = [list(s) for s in plan.stages]
    i = next(i for i, a in enumerate(stages[2]) if isinstance(a, Comm) and a.op is CommOp.SEND_GRAD)
    stages[2][i] = replace(stages[2][i], peer=0)
    with pytest.raises(PlanError, match=re.escape(f"stage 2, action {i} (>G0): SEND_GRAD must name peer stage 1, "
                                                  "not 0")):
        check_pipeline_plan(replace(plan, stages=tuple(map(tuple, stages))), ONE, [4])
