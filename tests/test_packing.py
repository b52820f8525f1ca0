"""Chunk construction (paper Algorithm 1): conservation, size cap, chain order, BFD-or-better."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow_pl.data.balance import DEFAULT_A_ATTN
from chunkflow_pl.data.packing import (
    _bfd,
    bfd_chunk_count,
    build_chunk_plan,
    lower_bound_chunks,
    packing_efficiency,
    split_sequences,
)
from chunkflow_pl.data.stats_core import format_table, length_histogram, summarize_global_batches
from chunkflow_pl.data.types import ChunkPlan, Segment


@st.composite
def length_batches(draw: st.DrawFn, max_seqs: int = 40) -> tuple[list[int], int]:
    """Lengths around the interesting edges (0, 1, C, C+1, multiples, 100 C) plus random ones."""
    c = draw(st.integers(1, 64))
    edge = st.sampled_from([0, 1, max(c - 1, 0), c, c + 1, 2 * c, 3 * c + 1, 100 * c])
    lengths = draw(st.lists(st.one_of(edge, st.integers(0, 5 * c)), max_size=max_seqs))
    return lengths, c


def lmsys_like(rng: np.random.Generator, n: int) -> list[int]:
    """Long tail: median ~300 tokens, a few up to 300K."""
    x = np.exp(rng.normal(np.log(300), 1.3, size=n)).astype(int) + 1
    return np.minimum(x, 300_000).tolist()


def pieces_by_seq(plan: ChunkPlan) -> dict[int, list[tuple[int, Segment]]]:
    out: dict[int, list[tuple[int, Segment]]] = {}
    for c, chunk in enumerate(plan.chunks):
        for seg in chunk:
            out.setdefault(seg.seq, []).append((c, seg))
    return out


def check_plan(lengths: list[int], c: int, plan: ChunkPlan) -> None:
    pieces = pieces_by_seq(plan)
    # conservation: each sequence's segments tile [0, L) exactly once; empty ones have none
    for s, n in enumerate(lengths):
        segs = sorted(seg for _, seg in pieces.get(s, []))
        assert all(seg.length > 0 for seg in segs)
        if n == 0:
            assert s not in pieces
            continue
        assert [seg.start for seg in segs] == [0] + [seg.end for seg in segs[:-1]]
        assert segs[-1].end == n
    assert set(pieces) <= set(range(len(lengths)))
    # size cap, no empty chunk
    for chunk in plan.chunks:
        assert 0 < sum(seg.length for seg in chunk) <= c
    # chains: exactly the sequences longer than C, in increasing chunk order, contiguous pieces
    assert set(plan.chains) == {s for s, n in enumerate(lengths) if n > c}
    for s, chain in plan.chains.items():
        assert chain == sorted(set(chain))
        assert [ci for ci, _ in sorted(pieces[s], key=lambda p: p[1].start)] == chain
        segs = [seg for ci in chain for seg in plan.chunks[ci] if seg.seq == s]
        assert len(segs) == len(chain)  # one piece of s per chunk
        assert [seg.start for seg in segs] == [j * c for j in range(len(chain))]
        assert all(seg.length == c for seg in segs[:-1])  # all but the last piece are full
    for s, n in enumerate(lengths):
        if 0 < n <= c:
            assert [seg for _, seg in pieces[s]] == [Segment(s, 0, n)]


@settings(max_examples=300, deadline=None)
@given(length_batches())
def test_plan_invariants_and_bfd_or_better(batch: tuple[list[int], int]) -> None:
    lengths, c = batch
    plan = build_chunk_plan(lengths, c)
    check_plan(lengths, c, plan)
    n = len(plan.chunks)
    assert lower_bound_chunks(lengths, c) <= n <= bfd_chunk_count(lengths, c)
    tokens = sum(lengths)
    if n:
        assert packing_efficiency(plan, c) == pytest.approx(tokens / (n * c))
        assert packing_efficiency(plan, c) >= tokens / (bfd_chunk_count(lengths, c) * c) - 1e-12
    assert build_chunk_plan(lengths, c) == plan  # deterministic


@settings(max_examples=200, deadline=None)
@given(length_batches())
def test_fast_bfd_matches_reference(batch: tuple[list[int], int]) -> None:
    lengths, c = batch
    full, items = split_sequences(lengths, c)
    bins = _bfd(items, c)
    assert sum(len(p) for p in full.values()) + len(bins) == bfd_chunk_count(lengths, c)


def test_docstring_example() -> None:
    plan = build_chunk_plan([20, 3, 5, 8, 0], 8)
    assert plan.chunks == [
        [Segment(3, 0, 8)],
        [Segment(2, 0, 5), Segment(1, 0, 3)],
        [Segment(0, 0, 8)],
        [Segment(0, 8, 16)],
        [Segment(0, 16, 20)],
    ]
    assert plan.chains == {0: [2, 3, 4]}


def test_edges() -> None:
    assert build_chunk_plan([], 4) == ChunkPlan(chunks=[], chains={})
    assert build_chunk_plan([0, 0], 4).chunks == []
    assert packing_efficiency(build_chunk_plan([], 4), 4) == 1.0
    exact = build_chunk_plan([8], 4)  # a multiple of C: a chain with no remainder
    assert exact.chunks == [[Segment(0, 0, 4)], [Segment(0, 4, 8)]] and exact.chains == {0: [0, 1]}
    assert build_chunk_plan([4], 4).chains == {}  # exactly C: one piece, not a chain
    huge = build_chunk_plan([400, 1], 4)  # 100 x C
    assert huge.chains[0] == list(range(100)) and len(huge.chunks) == 101
    # remainders of two chains share one chunk, after both chains
    two = build_chunk_plan([13, 14], 10)
    assert two.chains[0][-1] == two.chains[1][-1]
    shared = two.chains[0][-1]
    assert shared > max(two.chains[0][:-1] + two.chains[1][:-1])
    with pytest.raises(ValueError):
        build_chunk_plan([3], 0)
    with pytest.raises(ValueError):
        build_chunk_plan([-1], 4)


def test_lmsys_like_batches_with_a_long_tail_stay_within_the_bound() -> None:
    """Speed of the same case: benchmarks/data_speed.py."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = lmsys_like(rng, 256)
        lengths[0] = 200_000
        plan = build_chunk_plan(lengths, 4096)
        check_plan(lengths, 4096, plan)
        assert len(plan.chunks) <= lower_bound_chunks(lengths, 4096) + 1


def test_length_histogram_boundaries() -> None:
    k = 1024
    hist = length_histogram([0, k - 1, k, 4 * k - 1, 4 * k, 32 * k - 1, 32 * k, 128 * k - 1, 128 * k, 10**6])
    assert list(hist) == ["<1K", "1K-4K", "4K-32K", "32K-128K", ">128K"]
    assert list(hist.values()) == [2, 2, 2, 2, 2]
    assert length_histogram([]) == dict.fromkeys(hist, 0)


def test_summarize_global_batches() -> None:
    batches = [[10, 30, 5, 0], [100], []]
    summary = summarize_global_batches(batches, chunk_size=16, dp=2)
    assert summary["num_batches"] == 3
    assert summary["lower_bound_per_batch"] == [math.ceil(45 / 16), math.ceil(100 / 16), 0]
    assert summary["chunks_per_batch"] == [len(build_chunk_plan(b, 16).chunks) for b in batches]
    assert summary["chain_length_histogram"] == {2: 1, 7: 1}  # 30 -> 16+14, 100 -> 6 full + 4
    assert summary["micro_steps_per_batch"] == [2, 7, 0]
    # by hand: batch 0 = chunks [30:0-16] [30:16-30] [10+5], batch 1 = 6 x 16 + 4, batch 2 empty (1.0 by convention)
    assert summary["mean_packing_efficiency"] == pytest.approx((45 / 48 + 100 / 112 + 1.0) / 3, rel=1e-12)
    # dp=2: batch 0 puts the chain (30 tokens, 136 + 329 causal pairs) on one rank, [10+5] (55 + 15) on the
    # other; batch 1 is one chain, so one rank gets everything: max/mean = 2
    a = DEFAULT_A_ATTN
    batch0 = (30 + 465 * a) / ((45 + 535 * a) / 2)
    assert summary["dp_imbalance_max"] == 2.0
    assert summary["dp_imbalance_mean"] == pytest.approx((batch0 + 2.0 + 1.0) / 3, rel=1e-12)
    assert summary["length_histogram"]["<1K"] == 5
    table = format_table(summary)
    assert "chunks_per_batch" in table and "<1K: 5" in table
