"""Scheduler and checker: per-stage action lists with messages (pure python, no torch)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from single_device_oracle import plan_single_device

from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.graph import build_graph, forward_order
from chunkflow_pl.schedule.pipeline_actions import Action, Comm, CommOp, Op, PipeAction, PipelinePlan
from chunkflow_pl.schedule.pipeline_checker import DeadlockError, PlanError, check_pipeline, check_pipeline_plan
from chunkflow_pl.schedule.runner import pipeline_cost
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline
from chunkflow_pl.schedule.simulator import simulate
from chunkflow_pl.schedule.timeline import ascii_timeline

Chunks = list[list[Segment]]
_COMM = {">A": (CommOp.SEND_ACT, 1), "<A": (CommOp.RECV_ACT, -1), ">G": (CommOp.SEND_GRAD, -1),
         "<G": (CommOp.RECV_GRAD, 1)}
_COMPUTE = {"F": Op.FORWARD, "R": Op.RECOMPUTE, "B": Op.BACKWARD}


def parse_stage(text: str, stage: int, chunks: Chunks) -> list[PipeAction]:
    """``"<A0 F0(drop) >A0"`` on ``stage`` -> actions; peers are the neighbours, sizes the chunks' tokens."""
    out: list[PipeAction] = []
    for word in text.split():
        m = re.fullmatch(r"([<>][AG]|[FRB])(\d+)(\(drop\))?", word)
        assert m, word
        c = int(m[2])
        if m[1] in _COMM:
            op, step = _COMM[m[1]]
            out.append(Comm(op, c, stage + step, sum(s.length for s in chunks[c])))
        else:
            out.append(Action(_COMPUTE[m[1]], c, keep=m[3] is None))
    return out


def parse_stages(texts: list[str], chunks: Chunks) -> list[list[PipeAction]]:
    return [parse_stage(t, s, chunks) for s, t in enumerate(texts)]


def unit_cost(pp: int, tokens_per_unit: int = 4) -> CostModel:
    """Forward 1, backward 2, recompute 1 per chunk of ``tokens_per_unit`` tokens; free messages."""
    return CostModel.uniform(pp, per_token=1.0 / tokens_per_unit, per_pair=0.0)


# A chain 0 -> 1 -> 2 (sequence 0, 12 tokens) and standalone chunks 3 and 4: the scheduler's docstring example.
EXAMPLE: Chunks = [[Segment(0, 0, 4)], [Segment(0, 4, 8)], [Segment(0, 8, 12)], [Segment(1, 0, 4)],
                   [Segment(2, 0, 4)]]
EXAMPLE_LENS = [12, 4, 4]


def test_docstring_example_is_what_the_scheduler_gives() -> None:
    from chunkflow_pl.schedule import scheduler

    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=1, cost=unit_cost(2))
    check_pipeline_plan(plan, EXAMPLE, EXAMPLE_LENS)
    timeline = ascii_timeline(simulate(plan, EXAMPLE, EXAMPLE_LENS, unit_cost(2)).events, 2)
    doc = scheduler.__doc__
    for line in plan.text().splitlines() + timeline.splitlines():
        assert f"    {line}\n" in doc, line


# -- scheduler on real chunk mixes ----------------------------------------------------------------


@st.composite
def replicas(draw: st.DrawFn) -> tuple[Chunks, list[int]]:
    """One data-parallel rank's chunks (padded like the datamodule does) from the real data layer."""
    chunk_size = draw(st.integers(4, 48))
    lengths = draw(st.lists(st.integers(1, 160), min_size=1, max_size=24))
    plan = build_chunk_plan(lengths, chunk_size)
    dp = draw(st.integers(1, 4))
    assignment = assign_to_ranks(plan, dp)
    rank = draw(st.integers(0, dp - 1))
    mine = [plan.chunks[c] for c in assignment.per_rank[rank]]
    return mine + [[] for _ in range(assignment.num_micro_steps - len(mine))], lengths


@settings(max_examples=60, deadline=None)
@given(replicas(), st.integers(1, 8), st.integers(1, 4), st.sampled_from([1, 2, None]),
       st.sampled_from([0.0, 0.02]), st.sampled_from([0.0, 0.3]))
def test_scheduler_gives_valid_plans(case: tuple[Chunks, list[int]], pp: int, k: int, max_open: int | None,
                                   per_pair: float, latency: float) -> None:
    chunks, lens = case
    cost = CostModel.uniform(pp, per_token=0.1, per_pair=per_pair, comm_latency=latency)
    plan = plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open)
    check_pipeline_plan(plan, chunks, lens)
    assert plan.caps == default_caps(pp, k)
    assert plan == plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open)  # deterministic

    graph = build_graph(chunks, lens)
    forwards = [[a.chunk for a in plan.compute(s) if a.op is Op.FORWARD] for s in range(pp)]
    backwards = [[a.chunk for a in plan.compute(s) if a.op is Op.BACKWARD] for s in range(pp)]
    assert all(f == forwards[0] for f in forwards) and all(b == backwards[0] for b in backwards)
    assert sorted(forwards[0]) == [c for c, ch in enumerate(chunks) if ch]  # padding gets no action
    for members in graph.components:
        order = [c for c in forward_order(graph, members) if chunks[c]]
        if not order:
            continue
        pos = [forwards[0].index(c) for c in order]
        assert pos == list(range(pos[0], pos[0] + len(order)))  # a unit's forwards are contiguous, in order
        bpos = [backwards[0].index(c) for c in reversed(order)]
        assert bpos == sorted(bpos)  # backwards in reverse forward order
        # ... and no other chain's backward in between (one chain's state gradient at a time)
        between = {graph.component_of[c] for c in backwards[0][bpos[0]:bpos[-1] + 1]}
        assert all(len(graph.components[g]) == 1 for g in between - {graph.component_of[order[0]]})
        for s in range(pp):
            kept = [a.chunk for a in plan.compute(s) if a.op is Op.FORWARD and a.keep and a.chunk in members]
            assert kept == order[max(0, len(order) - k):]  # only the last k forwards keep activations

    result = simulate(plan, chunks, lens, cost)
    assert all(p <= cap for p, cap in zip(result.peak_live, plan.caps))
    chains = [m for m in graph.components if len(m) > 1]
    if max_open == 1 and chains:  # one chain's state at a time, as on one device
        assert max(result.peak_state_tokens) <= max(sum(s.length for c in m for s in chunks[c]) for m in chains)


@settings(max_examples=40, deadline=None)
@given(replicas(), st.integers(1, 4))
def test_one_stage_is_the_single_device_plan(case: tuple[Chunks, list[int]], k: int) -> None:
    chunks, lens = case
    plan = plan_pipeline(chunks, lens, pp=1, k=k)
    single = [a for a in plan_single_device(chunks, lens, k) if chunks[a.chunk]]
    assert list(plan.stages[0]) == single  # no messages, same compute actions


@settings(max_examples=40, deadline=None)
@given(replicas(), st.integers(1, 4), st.sampled_from(["tiny", "qwen0.5b", "qwen72b"]),
       st.sampled_from([0.0, 0.02, 5.0]))
def test_one_stage_plan_does_not_depend_on_the_cost_model(case: tuple[Chunks, list[int]], k: int, preset: str,
                                                         per_pair: float) -> None:
    """The step runner plans pp = 1 with the model's FLOP costs: on one stage they order nothing."""
    chunks, lens = case
    single = [a for a in plan_single_device(chunks, lens, k) if chunks[a.chunk]]
    for cost in (pipeline_cost(get_preset(preset), 1), CostModel.uniform(1, per_token=0.1, per_pair=per_pair)):
        assert list(plan_pipeline(chunks, lens, pp=1, k=k, cost=cost).stages[0]) == single


def megatron_1f1b(m: int, p: int, s: int) -> list[str]:
    """Textbook 1F1B order of stage s: warm-up forwards, then one forward one backward, then cool-down."""
    warmup = min(p - s - 1, m)
    order = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):
        order += [f"F{warmup + i}", f"B{i}"]
    return order + [f"B{i}" for i in range(m - warmup, m)]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_uniform_micro_batches_give_the_textbook_1f1b(p: int, m: int) -> None:
    chunks = [[Segment(i, 0, 4)] for i in range(m)]
    plan = plan_pipeline(chunks, [4] * m, p, k=1, cost=unit_cost(p))
    for s in range(p):
        assert [str(a) for a in plan.compute(s)] == megatron_1f1b(m, p, s)
    result = simulate(plan, chunks, [4] * m, unit_cost(p))
    assert result.step_time == 3 * (m + p - 1)
    assert result.bubble == ((p - 1) / (m + p - 1),) * p  # exact: (p-1)(f+b) idle of (m+p-1)(f+b)
    assert result.bubble_total == (p - 1) / (m + p - 1)


def test_open_chain_limit_lets_standalone_chunks_fill_the_gap() -> None:
    # Two chains of 3 chunks (sequences 0 and 1), then two standalone chunks.
    chunks = [[Segment(0, 0, 4)], [Segment(0, 4, 8)], [Segment(0, 8, 12)], [Segment(1, 0, 4)], [Segment(1, 4, 8)],
              [Segment(1, 8, 12)], [Segment(2, 0, 4)], [Segment(3, 0, 4)]]
    lens = [12, 12, 4, 4]
    one = plan_pipeline(chunks, lens, pp=4, k=1, cost=unit_cost(4), max_open_chains=1)
    many = plan_pipeline(chunks, lens, pp=4, k=1, cost=unit_cost(4), max_open_chains=None)
    fwd = [a.chunk for a in one.compute(0) if a.op is Op.FORWARD]
    assert fwd == [0, 1, 2, 6, 7, 3, 4, 5]  # the second chain waits; the standalone chunks go first
    assert [a.chunk for a in many.compute(0) if a.op is Op.FORWARD] == list(range(8))
    r1 = simulate(one, chunks, lens, unit_cost(4))
    rn = simulate(many, chunks, lens, unit_cost(4))
    assert max(r1.peak_state_tokens) == 8 < max(rn.peak_state_tokens) == 16  # 2 stored pieces per chain


def test_a_chains_kept_chunk_waits_for_the_previous_chains_recomputes() -> None:
    # Chains 0 -> 1 -> 2 and 3 -> 4, both open at once. On the last stage (cap 1) chunk 4's forward
    # must wait until chunk 0 is recomputed and done, or R0 would find no slot: a deadlock.
    chunks = [[Segment(0, 0, 4)], [Segment(0, 4, 8)], [Segment(0, 8, 12)], [Segment(1, 0, 4)], [Segment(1, 4, 8)]]
    plan = plan_pipeline(chunks, [12, 8], pp=2, k=1, cost=unit_cost(2), max_open_chains=None)
    check_pipeline_plan(plan, chunks, [12, 8])
    assert plan.text().splitlines()[1] == (
        "stage 1: <A0 F0(drop) <A1 F1(drop) <A2 F2 B2 >G2 <A3 F3(drop) R1 B1 >G1 R0 B0 >G0 <A4 F4 B4 >G4 R3 B3 >G3")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(pp=0, k=1), "pp must be >= 1"),
        (dict(pp=2, k=0), "k must be >= 1"),
        (dict(pp=2, k=2, caps=(2, 1)), r"caps \(2, 1\) must give each of the 2 stages at least k=2"),
        (dict(pp=2, k=1, cost=CostModel.uniform(3)), "cost model has 3 stages, the plan 2"),
        (dict(pp=2, k=1, max_open_chains=0), "max_open_chains must be >= 1"),
    ],
)
def test_scheduler_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_pipeline(EXAMPLE, EXAMPLE_LENS, **kwargs)


def test_fingerprint_changes_with_anything_a_rank_acts_on() -> None:
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=1, cost=unit_cost(2))
    other_k = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=2, cost=unit_cost(2))
    assert plan.fingerprint() == plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=1, cost=unit_cost(2)).fingerprint()
    assert plan.fingerprint() != other_k.fingerprint()
    stages = [list(s) for s in plan.stages]
    stages[1][0] = replace(stages[1][0], tokens=5)  # same text, different message size
    assert PipelinePlan(tuple(map(tuple, stages)), plan.caps, plan.chunk_tokens).fingerprint() != plan.fingerprint()


# -- checker: hand-made plans on 2 stages -------------------------------------------------------

TWO: Chunks = [[Segment(0, 0, 4)], [Segment(1, 0, 2)]]  # two standalone chunks (4 and 2 tokens)
TWO_LENS = [4, 2]
GOOD = ["F0 >A0 F1 >A1 <G0 B0 <G1 B1", "<A0 F0 B0 >G0 <A1 F1 B1 >G1"]


def check(texts: list[str], chunks: Chunks = TWO, lens: list[int] = TWO_LENS, caps=(2, 1), sends="async") -> None:
    check_pipeline(parse_stages(texts, chunks), chunks, lens, caps, sends=sends)


def test_checker_accepts_the_plan_the_mutations_below_break() -> None:
    check(GOOD)


def test_async_sends_finish_where_blocking_sends_hang() -> None:
    check(GOOD, sends="async")
    with pytest.raises(DeadlockError, match=re.escape(
            "deadlock with blocking sends: stage 0 waits for its receive on channel act 0->1 at action 3 (>A1); "
            "stage 1 waits for its receive on channel grad 1->0 at action 3 (>G0)")):
        check(GOOD, sends="blocking")
    # The same work with stage 0 receiving each gradient before the next send survives a rendezvous.
    check(["F0 >A0 <G0 B0 F1 >A1 <G1 B1", GOOD[1]], sends="blocking")


def test_scheduler_plans_rely_on_async_sends() -> None:
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=1, cost=unit_cost(2))
    check_pipeline_plan(plan, EXAMPLE, EXAMPLE_LENS, sends="async")
    with pytest.raises(DeadlockError, match=r"stage 0 waits for its receive on channel act 0->1 at action 7 \(>A3\)"):
        check_pipeline_plan(plan, EXAMPLE, EXAMPLE_LENS, sends="blocking")


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        # swapped sends: stage 0 sends chunk 1 first, stage 1 expects chunk 0 first
        (["F0 F1 >A1 >A0 <G0 B0 <G1 B1", GOOD[1]],
         "channel act 0->1: message #0 is sent as chunk 1 (2 tokens, stage 0 action 2) but received as chunk 0 "
         "(4 tokens, stage 1 action 0)"),
        # a missing receive
        (["F0 >A0 F1 >A1 B0 <G1 B1", GOOD[1]], "stage 0: missing RECV_GRAD of chunk 0"),
        # the backward runs before the gradient it needs is received
        (["F0 >A0 F1 >A1 B0 <G0 <G1 B1", GOOD[1]],
         "stage 0, action 5 (<G0): receive of chunk 0's output gradient after its backward"),
        (["F0 >A0 F1 >A1 <G0 B0 <G1 B1", "<A0 F0 >G0 B0 <A1 F1 B1 >G1"],
         "stage 1, action 2 (>G0): send of chunk 0's input gradient before its backward"),
        (["F0 >A0 F1 >A1 <G0 B0 <G1 B1", "F0 <A0 B0 >G0 <A1 F1 B1 >G1"],
         "stage 1, action 1 (<A0): receive of chunk 0's input after its forward"),
        # live activations above the cap of the last stage (1)
        (["F0 >A0 F1 >A1 <G0 B0 <G1 B1", "<A0 F0 <A1 F1 B0 >G0 B1 >G1"],
         "stage 1, action 3 (F1): live activations 2 exceed cap=1 (chunks [0, 1])"),
        # consistent lists, matched channels, but a cycle: stage 0 waits for a gradient before sending
        (["F0 F1 <G0 B0 >A0 >A1 <G1 B1", GOOD[1]],
         "deadlock with async sends: stage 0 waits for a send on channel grad 1->0 at action 2 (<G0); "
         "stage 1 waits for a send on channel act 0->1 at action 0 (<A0)"),
        # messages that do not exist on a stage
        (["F0 >A0 F1 >A1 <G0 B0 <G1 B1 >G1", GOOD[1]], "stage 0, action 8 (>G1): stage 0 of 2 has no SEND_GRAD"),
        (["F0 >A0 F1 >A1 <G0 B0 <G1 B1", "<A0 F0 >A0 B0 >G0 <A1 F1 B1 >G1"],
         "stage 1, action 2 (>A0): stage 1 of 2 has no SEND_ACT (it is the last stage)"),
        (["F0 >A0 F0 >A1 <G0 B0 <G1 B1", GOOD[1]], "stage 0, action 2 (F0): duplicate FORWARD of chunk 0"),
    ],
)
def test_checker_rejects_mutated_plans(texts: list[str], message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        check(texts)


def test_checker_rejects_wrong_peer_size_and_padding_messages() -> None:
    stages = parse_stages(GOOD, TWO)
    wrong_peer = [list(s) for s in stages]
    wrong_peer[0][1] = replace(wrong_peer[0][1], peer=2)
    with pytest.raises(PlanError, match=re.escape("stage 0, action 1 (>A0): SEND_ACT must name peer stage 1, not 2")):
        check_pipeline(wrong_peer, TWO, TWO_LENS, (2, 1))
    wrong_size = [list(s) for s in stages]
    wrong_size[1][0] = replace(wrong_size[1][0], tokens=3)
    with pytest.raises(PlanError, match=re.escape("stage 1, action 0 (<A0): message size 3 tokens, but chunk 0 has 4")):
        check_pipeline(wrong_size, TWO, TWO_LENS, (2, 1))
    padded = TWO + [[]]  # a padding chunk: no compute, no message
    check_pipeline(stages, padded, TWO_LENS, (2, 1))
    with pytest.raises(PlanError, match="chunk 2 has no tokens, so no action may name it"):
        check_pipeline([stages[0] + [Action(Op.FORWARD, 2)], stages[1]], padded, TWO_LENS, (2, 1))
    with pytest.raises(PlanError, match=re.escape("(padding chunks send nothing)")):
        check_pipeline([stages[0] + [Comm(CommOp.SEND_ACT, 2, 1, 0)], stages[1]], padded, TWO_LENS, (2, 1))


def test_checker_rejects_a_chain_backward_before_the_later_piece() -> None:
    chunks: Chunks = [[Segment(0, 0, 4)], [Segment(0, 4, 8)]]  # chunk 1 continues chunk 0
    good = ["F0 >A0 F1 >A1 <G1 B1 <G0 B0", "<A0 F0 <A1 F1 B1 >G1 B0 >G0"]
    check(good, chunks, [8], caps=(2, 2))
    with pytest.raises(PlanError, match=re.escape(
            "stage 1, action 4 (B0): backward of chunk 0 before the backward of chunk 1 it depends on")):
        check([good[0], "<A0 F0 <A1 F1 B0 >G0 B1 >G1"], chunks, [8], caps=(2, 2))


def test_checker_catches_every_single_action_removed_from_a_scheduler_plan() -> None:
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=3, k=1, cost=unit_cost(3))
    for s, acts in enumerate(plan.stages):
        for i in range(len(acts)):
            stages = [list(x) for x in plan.stages]
            del stages[s][i]
            with pytest.raises(PlanError):
                check_pipeline(stages, EXAMPLE, EXAMPLE_LENS, plan.caps)


def test_planning_runs_without_torch() -> None:
    # DESIGN.md: schedule planning is pure python. Block torch and plan, check and simulate a real batch.
    import subprocess
    import sys

    code = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
from chunkflow_pl.schedule.scheduler import plan_pipeline
from chunkflow_pl.schedule.simulator import simulate
lengths = [300, 20, 45, 7, 130, 64]
chunk_plan = build_chunk_plan(lengths, 64)
chunks = [chunk_plan.chunks[c] for c in assign_to_ranks(chunk_plan, 1).per_rank[0]]
cost = CostModel.from_model(get_preset("qwen7b"), 4)
plan = plan_pipeline(chunks, lengths, 4, 1, cost=cost)
check_pipeline_plan(plan, chunks, lengths)
print(simulate(plan, chunks, lengths, cost).step_time > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
