"""The data-parallel balance weighs chunks with the trained model's cost model (``CostModel.balance_cost``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chunkflow_pl.data.balance import DEFAULT_CHUNK_COST, ChunkCost, assign_to_ranks
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.datamodule import ChunkFlowDataModule
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.sources.synthetic import synthetic_lengths
from chunkflow_pl.data.types import ChunkPlan
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.pipeline_actions import Op

TINY = get_preset("tiny")
MODELS = {
    "tiny": TINY,
    "wide_mlp": replace(TINY, hidden_size=96, intermediate_size=1000, name="wide_mlp"),
    "qwen0.5b": get_preset("qwen0.5b"),
    "qwen7b": get_preset("qwen7b"),
    "qwen72b": get_preset("qwen72b"),
}


def long_tail_plans(batches: int = 8, batch: int = 32, chunk_size: int = 1024) -> list[ChunkPlan]:
    lens = synthetic_lengths(batches * batch, 8192, seed=1234).tolist()
    return [build_chunk_plan(lens[i * batch:(i + 1) * batch], chunk_size) for i in range(batches)]


def rank_costs(plan: ChunkPlan, per_rank: list[list[int]], cost: ChunkCost) -> list[float]:
    return [sum(cost(plan.chunks[c]) for c in lst) for lst in per_rank]


@pytest.mark.parametrize(("name", "pp"), [("tiny", 1), ("tiny", 3), ("wide_mlp", 1), ("qwen0.5b", 1),
                                          ("qwen0.5b", 5), ("qwen72b", 1), ("qwen72b", 8)])
def test_balance_cost_is_the_cost_models_forward_per_stage(name, pp):
    cost = CostModel.from_model(MODELS[name], pp)
    bal = cost.balance_cost()
    plans = long_tail_plans(batches=2)
    for plan in plans:
        for chunk in plan.chunks:
            stages = tuple(cost.op_time(Op.FORWARD, s, 0, chunk) for s in range(pp))
            assert bal.stage_costs(chunk) == stages  # the same numbers, not a second formula
            assert bal(chunk) == max(stages)  # a pipeline goes at its slowest stage's pace
    # the balancer's predicted per-rank costs are the cost model's forward times of the rank's chunks
    for plan in plans:
        got = assign_to_ranks(plan, 2, bal)
        want = [sum(max(cost.op_time(Op.FORWARD, s, 0, plan.chunks[c]) for s in range(pp)) for c in lst)
                for lst in got.per_rank]
        assert got.costs == pytest.approx(want, rel=1e-12)


def test_the_models_shape_sets_how_much_attention_weighs():
    ratio = {n: (lambda c: c.per_pair[0] / c.per_token[0])(CostModel.from_model(m, 1).balance_cost())
             for n, m in MODELS.items()}
    # ~1 / (6 D): the larger the hidden size, the less a (query, key) pair weighs against a token
    assert ratio["tiny"] > ratio["qwen0.5b"] > ratio["qwen7b"] > ratio["qwen72b"]
    assert ratio["wide_mlp"] < ratio["tiny"]  # a wide MLP adds per-token work, not per-pair
    fixed = DEFAULT_CHUNK_COST.per_pair[0] / DEFAULT_CHUNK_COST.per_token[0]
    assert ratio["qwen0.5b"] > 2 * fixed and ratio["qwen72b"] < fixed / 2  # the fixed 7B-class weight was off 2x


@pytest.mark.parametrize("name", ["tiny", "wide_mlp", "qwen72b"])
def test_balancing_with_the_models_cost_beats_the_fixed_weight_under_that_cost(name):
    cost = CostModel.from_model(MODELS[name], 1).balance_cost()
    ours = fixed = 0.0
    changed = 0
    for plan in long_tail_plans():
        a, b = assign_to_ranks(plan, 2, cost), assign_to_ranks(plan, 2, DEFAULT_CHUNK_COST)
        ca, cb = rank_costs(plan, a.per_rank, cost), rank_costs(plan, b.per_rank, cost)
        assert a.costs == pytest.approx(ca, rel=1e-12)
        ours += max(ca) / (sum(ca) / 2)
        fixed += max(cb) / (sum(cb) / 2)
        changed += a.per_rank != b.per_rank
    assert changed >= 3, "the model's shape should move chunks between ranks on long-tail batches"
    assert ours < fixed


def test_datamodule_assigns_chunks_with_the_cost_it_is_given():
    cost = CostModel.from_model(TINY, 1).balance_cost()
    data = DataConfig(num_sequences=96, global_batch_size=32, max_len="8k", seed=1234)
    dms = []
    for r in range(2):
        dm = ChunkFlowDataModule(data, chunk_size=1024, vocab_size=TINY.vocab_size, dp_rank=r, dp_size=2,
                                 chunk_cost=cost)
        dm.setup("fit")
        dms.append(dm)
    changed = 0
    for i in range(len(dms[0].dataset)):
        lens = [int(x) for x in dms[0].store.lengths[dms[0].dataset.sample_ids(0, i)]]
        plan = build_chunk_plan(lens, 1024)
        want, fixed = assign_to_ranks(plan, 2, cost), assign_to_ranks(plan, 2, DEFAULT_CHUNK_COST)
        for r, dm in enumerate(dms):
            got = [c.segments for c in dm.dataset[(0, i)].chunks if c.num_tokens]
            assert got == [tuple(plan.chunks[c]) for c in want.per_rank[r]]
        changed += want.per_rank != fixed.per_rank
    assert changed >= 1  # the argument matters on this data
    with pytest.raises(TypeError, match="ChunkCost"):
        ChunkFlowDataModule(data, chunk_size=1024, vocab_size=TINY.vocab_size, chunk_cost=1.0 / 4096)


def test_chunk_cost_rejects_mismatched_or_free_stages():
    with pytest.raises(ValueError, match="one entry"):
        ChunkCost(per_token=(1.0, 1.0), per_pair=(0.1,))
    with pytest.raises(ValueError, match="> 0"):
        ChunkCost(per_token=(0.0,), per_pair=(0.1,))
