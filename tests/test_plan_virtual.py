"""Planners with virtual stages as a candidate (``PlanSpec.virtual``): memory per rank, simulated time, the pick."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chunkflow_pl.model.config import get_preset
from chunkflow_pl.model.memory import estimate_stage_memory
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.plan.core import PlanSpec, format_table, plan_chunking, stage_peaks
from chunkflow_pl.plan.layout import ClusterSpec, plan_layout

CFG = get_preset("qwen7b", num_layers=8)
LENS = [[30000, 9000, 4000, 2000, 1500, 800, 600, 300] * 2]
SPEC = PlanSpec(memory_budget=2**50, precision="bf16-mixed", pp=4, chunk_sizes=(4096, 8192), ks=(1,),
                virtual=(1, 2))


def test_rank_memory_is_the_sum_of_its_blocks_with_their_own_layers_and_caps() -> None:
    peaks = stage_peaks(CFG, SPEC, 4096, 1, 30000, 8, virtual=2)
    blocks = split_stages(CFG.num_layers, 8)  # 8 blocks of one layer, block b on rank b % 4, cap 8 - b
    for r in range(4):
        want = sum(estimate_stage_memory(CFG, blocks[b], 4096, 8 - b, "bf16-mixed", "adamw", SPEC.loss_chunk,
                                         state_tokens=30000, boundary_tokens=0 if b == 0 else 7 * 4096).total
                   for b in (r, r + 4))
        assert peaks[r] == want
    assert stage_peaks(CFG, SPEC, 4096, 1, 30000, 8) < peaks  # v=1 (the default): fewer chunks in flight per rank


def test_chunk_planner_picks_two_virtual_stages_when_they_are_faster_and_fit() -> None:
    result = plan_chunking(CFG, SPEC, LENS)
    rows = {(r.chunk_size, r.virtual): r for r in result.rows}
    assert sorted(rows) == [(4096, 1), (4096, 2), (8192, 1), (8192, 2)]
    for c in (4096, 8192):
        assert rows[(c, 2)].step_time < rows[(c, 1)].step_time / 1.01  # interleaving beats the 1% tie
        assert rows[(c, 2)].peak > rows[(c, 1)].peak
    assert result.best.virtual == 2 and result.override() == "chunk.size=4096 chunk.k=1 parallel.virtual_stages=2"
    assert "  v " in format_table(result).splitlines()[0]
    both = plan_chunking(CFG, replace(SPEC, split_backward=(False, True)), LENS)
    assert both.override().endswith(" parallel.split_backward=true parallel.virtual_stages=2")


def test_chunk_planner_keeps_one_block_per_rank_when_two_do_not_fit_or_cannot_run() -> None:
    full = {(r.chunk_size, r.virtual): r for r in plan_chunking(CFG, SPEC, LENS).rows}
    budget = (full[(4096, 1)].peak + full[(4096, 2)].peak) // 2  # v=1 fits, v=2 does not
    tight = plan_chunking(CFG, replace(SPEC, memory_budget=budget), LENS)
    assert [(r.virtual, r.fits) for r in tight.rows if r.chunk_size == 4096] == [(1, True), (2, False)]
    assert tight.best.virtual == 1 and "virtual" not in tight.override()
    default = plan_chunking(CFG, replace(SPEC, virtual=(1,)), LENS)  # the default: nothing changes
    assert {r.virtual for r in default.rows} == {1} and "  v " not in format_table(default).splitlines()[0]
    assert {r.virtual for r in plan_chunking(CFG, replace(SPEC, pp=1), LENS).rows} == {1}  # no pipeline
    assert {r.virtual for r in plan_chunking(CFG, replace(SPEC, pp=8, virtual=(1, 2)), LENS).rows} == {1}  # 16 > 8
    with pytest.raises(ValueError, match="virtual candidates"):
        PlanSpec(memory_budget=1, virtual=(0,))


def test_layout_planner_considers_virtual_stages_and_names_them_when_chosen() -> None:
    spec = replace(SPEC, chunk_sizes=(8192,), memory_budget=0)
    result = plan_layout(CFG, spec, ClusterSpec(4, 2**40), LENS, layer_checkpoints=("none",))
    fitting = [r for r in result.rows if r.fits]
    assert {r.layout.virtual for r in fitting if r.layout.pp == 1} == {1}
    assert {r.layout.virtual for r in fitting if r.layout.pp == 4} == {1, 2}
    assert {r.layout.dp for r in result.rows if r.layout.virtual > 1} == {1}  # the runtime refuses v > 1 with dp
    four = {r.layout.virtual: r for r in fitting if r.layout.pp == 4}
    assert four[2].compute_time < four[1].compute_time and four[2].peak > four[1].peak
    # 2 cards that only a pipeline fits (pp=1 needs 49+ GiB a rank here): the interleaved pipeline wins, named
    two = plan_layout(CFG, spec, ClusterSpec(2, 48 * 2**30), LENS, layer_checkpoints=("none",))
    assert two.best.layout.pp == 2 and two.override().endswith(" parallel.virtual_stages=2")
    # a card too small for the interleaved pipeline's extra chunks in flight: v=2 loses by memory
    small = plan_layout(CFG, spec, ClusterSpec(4, (four[1].peak + four[2].peak) // 2, max_pp=4), LENS,
                        layer_checkpoints=("none",))
    assert small.best is not None and small.best.layout.virtual == 1 and "virtual" not in small.override()
