"""Single-device chunk scheduling (paper Algorithm 2): the chunk graph, and the test oracle's scheduler and checker.

``single_device_oracle.py`` writes the single-device order directly; production plans every layout with the
scheduler, whose one-stage plans ``test_pipeline_plan.py`` holds equal to this oracle's.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from single_device_oracle import check_plan, peak_live_activations, plan_single_device

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.graph import build_graph
from chunkflow_pl.schedule.pipeline_actions import Action, Op
from chunkflow_pl.schedule.pipeline_checker import PlanError

Chunks = list[list[Segment]]
Case = tuple[Chunks, list[int]]  # chunks, seq_lens
_OPS = {"F": Op.FORWARD, "R": Op.RECOMPUTE, "B": Op.BACKWARD}


def parse_plan(text: str) -> list[Action]:
    """``"F0(drop) F1 B1 R0 B0"`` -> actions; the inverse of ``str(Action)``."""
    actions = []
    for word in text.split():
        m = re.fullmatch(r"([FRB])(\d+)(\(drop\))?", word)
        assert m, word
        actions.append(Action(_OPS[m[1]], int(m[2]), keep=m[3] is None))
    return actions


def show(actions: list[Action]) -> str:
    return " ".join(str(a) for a in actions)


def build_chunks(seq_lens: list[int], chunk_size: int) -> Chunks:
    """Small stand-in for chunk construction: full pieces of long sequences get a chunk each; the
    remainders and short sequences are packed first-fit, so one chunk may hold several tails."""
    chunks: Chunks = []
    leftovers: list[Segment] = []
    for s, n in enumerate(seq_lens):
        start = 0
        while n - start > chunk_size:
            chunks.append([Segment(s, start, start + chunk_size)])
            start += chunk_size
        leftovers.append(Segment(s, start, n))
    bins: Chunks = []
    for seg in leftovers:
        for b in bins:
            if sum(x.length for x in b) + seg.length <= chunk_size:
                b.append(seg)
                break
        else:
            bins.append([seg])
    return chunks + bins


@st.composite
def chunk_sets(draw: st.DrawFn) -> Case:
    chunk_size = draw(st.integers(2, 16))
    seq_lens = draw(st.lists(st.integers(1, 64), min_size=1, max_size=10))
    chunks = build_chunks(seq_lens, chunk_size)
    # Shuffle chunk indices so the forward order is a real topological sort, not the identity.
    order = draw(st.permutations(range(len(chunks))))
    return [chunks[i] for i in order], seq_lens


# -- scheduler properties ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(chunk_sets(), st.integers(1, 6))
def test_plan_is_valid_and_bounded(case: Case, k: int) -> None:
    chunks, seq_lens = case
    plan = plan_single_device(chunks, seq_lens, k)
    check_plan(plan, chunks, seq_lens, k)

    graph = build_graph(chunks, seq_lens)
    recomputes = Counter(a.chunk for a in plan if a.op is Op.RECOMPUTE)
    assert all(n == 1 for n in recomputes.values())
    for members in graph.components:
        n_recomputed = sum(recomputes[c] for c in members)
        assert n_recomputed == max(0, len(members) - k)  # so none when k >= component size

    largest = max(len(m) for m in graph.components)
    assert peak_live_activations(plan) == min(k, largest) <= k

    # One component at a time: its actions form one contiguous run, so one group's state is alive.
    runs = [graph.component_of[a.chunk] for a in plan]
    starts = [comp for i, comp in enumerate(runs) if i == 0 or runs[i - 1] != comp]
    assert len(starts) == len(set(starts)) == len(graph.components)


@settings(max_examples=50, deadline=None)
@given(chunk_sets(), st.integers(1, 6), st.data())
def test_checker_rejects_any_plan_missing_an_action(case: Case, k: int, data: st.DataObject) -> None:
    chunks, seq_lens = case
    plan = plan_single_device(chunks, seq_lens, k)
    i = data.draw(st.integers(0, len(plan) - 1))
    with pytest.raises(PlanError):
        check_plan(plan[:i] + plan[i + 1 :], chunks, seq_lens, k)


def test_chain_of_four_with_k1_recomputes_all_but_last() -> None:
    chunks = [[Segment(0, 4 * i, 4 * i + 4)] for i in range(4)]
    plan = plan_single_device(chunks, [16], k=1)
    assert show(plan) == "F0(drop) F1(drop) F2(drop) F3 B3 R2 B2 R1 B1 R0 B0"
    assert show(plan_single_device(chunks, [16], k=2)) == "F0(drop) F1(drop) F2 F3 B3 B2 R1 B1 R0 B0"
    assert show(plan_single_device(chunks, [16], k=4)) == "F0 F1 F2 F3 B3 B2 B1 B0"


def test_packed_tails_join_chains_and_order_is_stable() -> None:
    # a=11, b=13, c=5 tokens in chunks of 8; listed out of dependency order on purpose.
    chunks = [
        [Segment(0, 8, 11), Segment(1, 8, 13)],  # 0: tails of a and b
        [Segment(2, 0, 5)],  # 1: standalone c
        [Segment(1, 0, 8)],  # 2: head of b
        [Segment(0, 0, 8)],  # 3: head of a
    ]
    graph = build_graph(chunks, [11, 13, 5])
    assert graph.components == ((0, 2, 3), (1,))
    assert graph.fwd_deps[0] == {2, 3} and graph.bwd_deps[3] == {0}
    plan = plan_single_device(chunks, [11, 13, 5], k=1)
    assert show(plan) == "F2(drop) F3(drop) F0 B0 R3 B3 R2 B2 F1 B1"


# -- graph validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "seq_lens", "match"),
    [
        ([[Segment(0, 0, 4)], [Segment(0, 5, 8)]], [8], r"sequence 0: .*gap at token 4"),
        ([[Segment(0, 0, 4)], [Segment(0, 3, 8)]], [8], r"sequence 0: .*overlap at token 3"),
        ([[Segment(1, 0, 4)], [Segment(0, 0, 4)]], [4, 6], r"sequence 1: pieces end at token 4"),
        ([[Segment(0, 0, 4)], [Segment(0, 4, 9)]], [8], r"sequence 0: pieces end at token 9"),
        ([[Segment(0, 2, 4)]], [4], r"sequence 0: .*gap at token 0"),
        ([[Segment(3, 0, 4)]], [4], r"sequence 3, not in seq_lens"),
        ([[Segment(0, 2, 2)]], [4], r"empty"),
        # Each chunk continues the other's sequence.
        ([[Segment(0, 0, 4), Segment(1, 4, 8)], [Segment(1, 0, 4), Segment(0, 4, 8)]], [8, 8], r"cycle"),
        # Two consecutive pieces in one chunk would read their own chunk's state.
        ([[Segment(0, 0, 4), Segment(0, 4, 8)]], [8], r"cycle among chunks \[0\]"),
    ],
)
def test_graph_rejects_bad_chunks(chunks: Chunks, seq_lens: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_graph(chunks, seq_lens)
    with pytest.raises(ValueError, match=match):
        plan_single_device(chunks, seq_lens, k=1)


def test_sequences_absent_from_chunks_are_allowed() -> None:
    # A data-parallel rank sees seq_lens of the whole global batch but only its own chunks.
    assert show(plan_single_device([[Segment(1, 0, 3)]], [100, 3], k=1)) == "F0 B0"


def test_scheduler_rejects_k_below_one() -> None:
    with pytest.raises(ValueError, match="k must be >= 1"):
        plan_single_device([[Segment(0, 0, 4)]], [4], k=0)


# -- checker: one hand-made bad plan per rule -----------------------------------------------------

CHAIN2: Case = ([[Segment(0, 0, 4)], [Segment(0, 4, 8)]], [8])  # chunk 1 continues chunk 0
TWO: Case = ([[Segment(0, 0, 4)], [Segment(1, 0, 4)]], [4, 4])  # two standalone chunks


@pytest.mark.parametrize(
    ("case", "plan", "k"),
    [
        (CHAIN2, "F0 F1 B1 B0", 2),
        (CHAIN2, "F0(drop) F1 B1 R0 B0", 1),
        (TWO, "F0 B0 F1 B1", 1),
        (TWO, "F1 B1 F0(drop) R0 B0", 1),
    ],
)
def test_checker_accepts_the_valid_plans_the_bad_ones_mutate(case: Case, plan: str, k: int) -> None:
    check_plan(parse_plan(plan), *case, k)


@pytest.mark.parametrize(
    ("case", "plan", "k", "message"),
    [
        (TWO, "F0 B0 F1 B1 R7", 1, "action 4 (R7): chunk index 7 out of range [0, 2)"),
        (TWO, "F0 B0 B1", 1, "missing FORWARD of chunks [1]"),
        (TWO, "F0 B0 F1", 1, "missing BACKWARD of chunks [1]"),
        (TWO, "F0 B0 F1 B1 F1", 1, "action 4 (F1): duplicate FORWARD of chunk 1"),
        (TWO, "F0 B0 B0 F1 B1", 1, "action 2 (B0): duplicate BACKWARD of chunk 0"),
        (CHAIN2, "F1 F0 B1 B0", 2, "action 0 (F1): forward of chunk 1 before the forward of chunk 0"),
        (CHAIN2, "F0 F1 B0 B1", 2, "action 2 (B0): backward of chunk 0 before the backward of chunk 1"),
        (TWO, "B0 F0 F1 B1", 2, "action 0 (B0): backward of chunk 0 before its own forward"),
        (TWO, "F0 R0 B0 F1 B1", 2, "action 1 (R0): recompute of chunk 0 whose forward kept"),
        (CHAIN2, "F0(drop) F1 B1 R0 R0 B0", 2, "action 4 (R0): second recompute of chunk 0"),
        (TWO, "F0 B0 R0 F1 B1", 1, "action 2 (R0): recompute of chunk 0 after its backward"),
        (TWO, "R0 F0(drop) B0 F1 B1", 1, "action 0 (R0): recompute of chunk 0 before its forward"),
        (CHAIN2, "F0(drop) F1 B1 B0", 1, "action 3 (B0): backward of chunk 0 without a recompute"),
        (TWO, "F0 F1 B0 B1", 1, "action 1 (F1): live activations 2 exceed k=1"),
        (CHAIN2, "F0(drop) F1 R0 B1 B0", 1, "action 2 (R0): live activations 2 exceed k=1"),
        (TWO, "F0 B0 F1 B1", 0, "k must be >= 1"),
    ],
)
def test_checker_rejects_bad_plan(case: Case, plan: str, k: int, message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        check_plan(parse_plan(plan), *case, k)


def test_peak_live_activations_counts_kept_forwards_and_recomputes() -> None:
    assert peak_live_activations(parse_plan("F0(drop) F1(drop) F2 B2 R1 B1 R0 B0")) == 1
    assert peak_live_activations(parse_plan("F0(drop) F1 F2 B2 B1 R0 B0")) == 2
    assert peak_live_activations(parse_plan("F0 F1 R0 B0 B1")) == 3  # invalid, but still counted
    assert peak_live_activations([]) == 0
