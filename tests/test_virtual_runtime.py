"""Virtual stages at run time (``parallel.virtual_stages``): a rank holds blocks ``r, r + pp, ...``, one executor and
one transport per block, and runs ``PipelinePlan.rank_actions`` of the interleaved scheduler's plans
(``plan_pipeline(virtual=)``), with or without split backward (``parallel.split_backward``: B and W actions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from multiproc import free_port, spawn_ranks

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.stages import rank_blocks, split_blocks
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
from chunkflow_pl.schedule.runner import forward_plan, pipeline_cost
from chunkflow_pl.schedule.scheduler import plan_pipeline
from chunkflow_pl.strategy.dims import ParallelDims

CHUNK = 16
LENS = [5, 40, 13, 1, 70, 33, 16, 17]  # chains of 2-5 chunks and packed short sequences
PP, V, LAYERS = 2, 2, 5  # blocks of 2, 1, 1, 1 layers: rank 0 holds layers 0 1 3 (+ embed), rank 1 layers 2 4 + head


def case(tie: bool = True):
    """The model config and the one global batch every process builds identically (float64)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=LAYERS, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512, tie_word_embeddings=tie)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(LENS, CHUNK)
    batch = assemble_step(plan.chunks, seqs, targets, LENS, list(range(len(seqs))), n_label, 0, len(plan.chunks))
    return cfg, batch


def build(cfg, stage=None) -> Qwen2Decoder:
    model = Qwen2Decoder(cfg, loss_chunk=8, stage=stage).double()
    model.reset_parameters(0.2, generator=torch.Generator().manual_seed(3))  # same values by name on any split
    return model


# ---- model: a rank's blocks under whole-model names ------------------------------------------------------------

def test_a_rank_holds_its_blocks_under_whole_model_names():
    cfg, _ = case()
    whole = build(cfg)
    parts = [build(cfg, rank_blocks(LAYERS, PP, V, r)) for r in range(PP)]
    assert [b.layer_ids for b in split_blocks(LAYERS, PP, V)] == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert parts[0].stage.ids == (0, 2) and parts[1].stage.ids == (1, 3)
    names = [dict(p.named_parameters()) for p in parts]
    assert {n.split(".")[1] for n in names[0] if n.startswith("layers.")} == {"0", "1", "3"}
    assert {n.split(".")[1] for n in names[1] if n.startswith("layers.")} == {"2", "4"}
    # every whole-model name on some rank with the whole model's value; the tied head (embed.weight) on both ends
    ref = dict(whole.named_parameters())
    assert set(names[0]) | set(names[1]) == set(ref)
    assert set(names[0]) & set(names[1]) == {"embed.weight"}
    for part in names:
        for n, p in part.items():
            assert torch.equal(p, ref[n]), n
    # block views run exactly their layers: blocks 0 and 2 of rank 0 chained with rank 1's equal the whole model
    _, batch = case()
    cb = batch.chunks[0]
    from chunkflow_pl.model.attention import VarlenMeta

    meta = VarlenMeta.from_lengths([s.length for s in cb.segments], [0] * len(cb.segments))
    x = cb.input_ids_T
    for b in range(PP * V):
        x, _ = parts[b % PP].block(b)(x, cb.position_ids_T, meta)
    want, _ = whole(cb.input_ids_T, cb.position_ids_T, meta)
    assert torch.equal(x, want)
    with pytest.raises(ValueError, match="pass block="):
        parts[0](cb.input_ids_T, cb.position_ids_T, meta)


def test_hf_export_of_the_ranks_loads_into_the_whole_model(tmp_path):
    """Each rank writes its shard as a pipeline stage does (``strategy/export.py``; the tied head only from the rank
    holding block 0); the merged directory loads by name into the whole model."""
    from chunkflow_pl.model.hf_io import load_pretrained, save_hf_shard, write_hf_config

    cfg, _ = case()
    weight_map = {}
    for r in range(PP):
        part = build(cfg, rank_blocks(LAYERS, PP, V, r))
        skip = {"embed.weight"} if not part.stage.takes_ids else None
        weight_map |= save_hf_shard(part, tmp_path, f"model-{r + 1:05d}-of-{PP:05d}.safetensors", skip=skip)
    write_hf_config(tmp_path, cfg, weight_map, "float64", index=True)
    loaded = Qwen2Decoder(cfg).double()
    load_pretrained(loaded, tmp_path, cfg)
    for (n, a), (_, b) in zip(build(cfg).named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n


def test_virtual_stage_settings_fail_early_naming_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"parallel.virtual_stages=2 with parallel.pp=1: .*nothing to interleave"):
        ParallelConfig(virtual_stages=2)
    with pytest.raises(ValueError, match=r"virtual_stages=2 with 2 data-parallel ranks.*parallel.virtual_stages=1"):
        ParallelConfig(pp=2, dp=2, virtual_stages=2)
    with pytest.raises(ValueError, match=r"parallel=auto"):
        ParallelConfig(pp=2, virtual_stages=2, auto=True)
    with pytest.raises(ValueError, match="must be a positive integer"):
        ParallelConfig(pp=2, virtual_stages=0)
    with pytest.raises(ValueError, match=r"2 x 3 blocks, but the model has 5 layers.*virtual_stages <= 2"):
        ParallelDims(dp=1, pp=2, world_size=2, num_layers=5, virtual=3)
    assert ParallelConfig(pp=2, virtual_stages=2).virtual_stages == 2


# ---- plans the runtime takes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [False, True])
def test_plans_the_runtime_takes_are_valid_per_block_and_order_every_action_once(split):
    cfg, batch = case()
    chunks = [c.segments for c in batch.chunks]
    plan = plan_pipeline(chunks, batch.seq_lens, PP, 1, cost=pipeline_cost(cfg, PP, V), virtual=V,
                         split_backward=split)
    check_pipeline_plan(plan, chunks, batch.seq_lens)  # every per-block rule
    for r in range(PP):
        mine = plan.order[r]
        for b in range(r, PP * V, PP):  # each block's list, whole and in its order
            assert [i for blk, i in mine if blk == b] == list(range(len(plan.stages[b])))
        assert {blk for blk, _ in mine} == set(range(r, PP * V, PP))
    fwd = forward_plan(chunks, PP, V)
    assert [blk for blk, _ in fwd.order[0][:6]] == [0, 0, 2, 2, 2, 0]  # chunk 0 through blocks 0 and 2, then chunk 1


def test_runner_refuses_what_it_cannot_run_before_any_message():
    from dataclasses import replace

    from chunkflow_pl.schedule.pipeline_checker import PlanError, check_rank_order
    from chunkflow_pl.schedule.runner import StepRunner
    from chunkflow_pl.schedule.transport import LocalTransport

    cfg, batch = case()
    chunks = [c.segments for c in batch.chunks]
    with pytest.raises(ValueError, match=r"transport must map each block of rank 0 \(0, 2\)"):
        StepRunner(cfg, 1, "cpu", stage=0, pp=PP, virtual=V, transport=LocalTransport())
    runner = StepRunner(cfg, 1, "cpu", stage=0, pp=PP, virtual=V, transport={0: LocalTransport(), 2: LocalTransport()})
    plan = plan_pipeline(chunks, batch.seq_lens, PP, 1, cost=runner.cost, virtual=V)
    runner._check_virtual(plan)
    mine = list(plan.order[0])
    j = next(j for j in range(len(mine) - 1) if mine[j][0] == mine[j + 1][0])  # two actions of one block in a row
    mine[j], mine[j + 1] = mine[j + 1], mine[j]
    # an order that breaks a block's list, or leaves some of it unrun: refused by the check plan_step runs
    # (check_pipeline_plan -> check_rank_order) before the runner sees the plan
    with pytest.raises(PlanError, match=r"block \d's list must run in its own order, next is its action \d+"):
        check_rank_order(replace(plan, order=(tuple(mine), plan.order[1])))
    with pytest.raises(PlanError, match=r"rank 0's order runs \d+ of block \d's \d+ actions"):
        check_rank_order(replace(plan, order=(plan.order[0][:-1], plan.order[1])))
    with pytest.raises(ValueError, match="the plan has 4 ranks x 1 virtual stages, the runner 2 x 2"):
        runner._check_virtual(plan_pipeline(chunks, batch.seq_lens, PP * V, 1))


# ---- exactness over gloo: pp=2 x v=2 equals one process ----------------------------------------------------------

class Trainer:
    """AdamW (decay and no-decay groups, as training builds them) steps clipped at a norm the gradients exceed."""

    def __init__(self, model, run_step, finish) -> None:
        from chunkflow_pl.training.optim import param_groups

        self.model, self.run_step, self.finish = model, run_step, finish
        self.opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)

    def step(self, batch) -> dict[str, torch.Tensor]:
        """One step; its (clipped) gradients by name."""
        self.opt.zero_grad(set_to_none=True)
        self.run_step(self.model, batch)
        self.finish(self.model)
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}
        self.opt.step()
        return grads

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}


def strategy_with_headers(rank: int, port: int, dims, split: bool = False):
    """``multiproc.gloo_strategy`` with ``check_messages``: the ranks compare plan fingerprints every step and every
    message carries a header its receiver checks against its own block's plan (step, chunk, tokens, kind), so a
    message delivered on another block pair's channel fails naming it instead of passing unnoticed."""
    import os

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    strategy = ChunkFlowStrategy(dims, accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * 2,
                                 cluster_environment=LightningEnvironment(), check_messages=True,
                                 split_backward=split)
    strategy.setup_environment()
    return strategy


def _virtual_worker(rank: int, port: int, out_dir: str, split: bool) -> None:
    from chunkflow_pl.schedule.evaluation import EvalSums
    from chunkflow_pl.strategy import checkpoint as ckpt
    from chunkflow_pl.strategy.split_backward import apply_split_backward

    strategy = strategy_with_headers(rank, port, ParallelDims(dp=1, pp=PP, world_size=2, num_layers=LAYERS,
                                                             virtual=V), split)
    try:
        cfg, batch = case()

        def trainer() -> Trainer:
            model = build(cfg, strategy.stage_spec)
            if split:  # what the strategy's setup does before the optimizer is built
                assert apply_split_backward(model) == 7 * len(strategy.stage_spec.layer_ids)
            return Trainer(model, strategy.run_chunk_step, lambda m: strategy.finish_gradients(m, max_norm=0.5))

        run = trainer()
        sums = EvalSums((8, 32))  # validation first, on the initial weights (equal to the reference's by name)
        strategy.run_eval_step(run.model, batch, sums)
        grads = run.step(batch)
        path = Path(out_dir, "v2.ckpt")
        ckpt.save_checkpoint({"global_step": 1}, path, run.model, [run.opt], rank == 0, barrier=strategy.barrier)
        strategy.record_timeline = True
        run.step(batch)
        resumed = trainer()  # a new process's model and optimizer, resumed from the step-1 checkpoint
        ckpt.load_checkpoint(path, resumed.model, [resumed.opt])
        strategy.record_timeline = False
        events = strategy.last_timeline.events
        resumed.step(batch)
        same = all(torch.equal(a, b) for a, b in zip(run.weights().values(), resumed.weights().values()))
        torch.save({"grads": grads, "weights": run.weights(), "loss": strategy.last_run.stats.global_loss_sum,
                    "events": events, "resumed_equal": same, "eval": sums.values()}, Path(out_dir, f"rank{rank}.pt"))
    finally:
        strategy.destroy_process_groups()


def reference():
    from chunkflow_pl.schedule.evaluation import EvalSums
    from chunkflow_pl.schedule.runner import StepRunner
    from chunkflow_pl.strategy.gradients import GradGroups, finish_gradients

    cfg, batch = case()
    runner = StepRunner(cfg, 1, "cpu")
    stats = {}

    def run_step(m, b):
        stats["loss"] = runner.run(m, b).stats.loss_sum

    def trainer() -> Trainer:
        return Trainer(build(cfg), run_step, lambda m: finish_gradients(m, 0.5, GradGroups(None, None, None), 1, None))

    run = trainer()
    sums = EvalSums((8, 32))
    runner.evaluate(run.model, batch, sums)
    grads = run.step(batch)
    after_one = run.weights()
    run.step(batch)
    return grads, after_one, run.weights(), stats["loss"], trainer, sums.values()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split_backward"])
def test_pp2_v2_over_gloo_equals_one_process(tmp_path, monkeypatch, split):
    """2 gloo processes x 2 blocks each, float64, chains over up to 5 chunks, k=1 (recompute), tied embeddings (the
    head on rank 1's block 3), clipping active: gradients and weights after 2 AdamW steps equal one (unsplit)
    process's, with and without split backward (B and W actions of each block); a DCP checkpoint of the v=2 ranks
    resumes bit-identically and loads, by name, into the whole model."""
    from chunkflow_pl.strategy import checkpoint as ckpt

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_virtual_worker, (free_port(), str(tmp_path), split), timeout=60, hang="the virtual pipeline hangs")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(PP)]
    ref_grads, ref_one, ref_weights, ref_loss, trainer, ref_eval = reference()
    # validation (forward-only, chunk by chunk through each rank's blocks): the block with the head sums the losses
    assert parts[0]["eval"] == [0.0] * len(ref_eval)
    assert max(abs(a - b) for a, b in zip(parts[1]["eval"], ref_eval)) < 1e-12 * max(ref_eval)
    for r, part in enumerate(parts):
        for n, g in part["grads"].items():
            assert rel(g, ref_grads[n]) < 1e-10, (r, n, rel(g, ref_grads[n]))
        for n, w in part["weights"].items():
            assert rel(w, ref_weights[n]) < 1e-10, (r, n, rel(w, ref_weights[n]))
        assert part["resumed_equal"], r
    assert set(parts[0]["weights"]) | set(parts[1]["weights"]) == set(ref_weights)
    # the loss of the last step reached every rank (from the block with the head)
    assert parts[0]["loss"] == parts[1]["loss"] and abs(parts[0]["loss"] / ref_loss - 1) < 1e-12
    # the ranks' checkpoint holds whole-model names: one process loads it into the whole model and its optimizer
    whole = trainer()
    ckpt.load_checkpoint(tmp_path / "v2.ckpt", whole.model, [whole.opt])
    for n, w in whole.weights().items():
        assert rel(w, ref_one[n]) < 1e-10, n
    assert len(whole.opt.state) == len(ref_weights)  # every parameter's AdamW moments came back
    # the recorded step labels each action with its block: rank 0 ran blocks 0 and 2, rank 1 blocks 1 and 3
    for r, part in enumerate(parts):
        blocks = {e[4] for e in part["events"]}
        assert blocks == set(range(r, PP * V, PP)), (r, blocks)
        weights = {e[4] for e in part["events"] if e[0] == "weight"}  # split: every block ran W actions
        assert weights == (blocks if split else set()), (r, weights)
    json.dumps([list(e) for e in parts[0]["events"]])  # the timeline callback writes them as JSON


# ---- timeline: a rank's blocks told apart ------------------------------------------------------------------------

def test_timeline_tells_a_ranks_blocks_apart(tmp_path):
    from PIL import Image

    from chunkflow_pl.schedule.timeline import COLORS, TimedEvent, ascii_timeline, draw_timeline

    # rank 0 runs chunk 0 forward on block 0, then (after rank 1's block 1) on block 2: same op, same chunk
    events = [TimedEvent(0, "forward", 0, 0.0, 1.0, 0), TimedEvent(1, "forward", 0, 1.0, 2.0, 1),
              TimedEvent(0, "forward", 0, 2.0, 3.0, 2), TimedEvent(1, "forward", 0, 3.0, 4.0, 3)]
    assert ascii_timeline(events, 2).splitlines()[1:] == ["stage 0  F0@0 .    F0@2 .", "stage 1  .    F0@1 .    F0@3"]

    def forward_pixels(evs) -> int:
        path = draw_timeline(evs, tmp_path / "t.png", 2, labels=False, legend=False, dpi=50)
        with Image.open(path) as img:
            rgb = tuple(int(COLORS["forward"][i:i + 2], 16) for i in (1, 3, 5))
            return sum(1 for p in img.convert("RGB").getdata() if p == rgb)

    plain = forward_pixels([e._replace(block=None) for e in events])
    # a rank's second block is hatched: fewer pixels of the forward colour, by about half of its two bars' share
    assert forward_pixels(events) < 0.85 * plain


def test_memory_estimate_of_a_rank_counts_its_blocks_at_their_largest_cap():
    """Rank 0 of pp=2 x v=2 holds blocks 0 and 2 (caps 4 and 2 of a 4-block 1F1B at k=1): its layers counted with 4
    live chunks, more than the 2 of the rank's plain pp=2 stage with the same layers."""
    from dataclasses import replace

    from chunkflow_pl.strategy.memory_check import MemoryRequest, stage_estimates

    cfg = replace(case()[0], num_layers=8)
    plain = MemoryRequest(cfg, 1024, 1, "32-true", "adamw", 256, 8192, pp=PP)
    virtual = stage_estimates(replace(plain, virtual=V))
    as_cap = [stage_estimates(replace(plain, chunk_k=cap))[r] for r, cap in ((0, 4), (1, 3))]
    for r in range(PP):  # the same layers (4 per rank); the rank's largest block cap as its live chunks
        assert virtual[r].total == as_cap[r].total > stage_estimates(plain)[r].total, r
