"""The step runner (schedule/runner.py): one path for every layout; on one stage, exactly Algorithm 2's step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_hf_model
from single_device_oracle import plan_single_device

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.runner import StepRunner

CHUNK = 16
LENS = [5, 40, 13, 1, 70, 33, 16, 17]  # chains of 2-5 chunks, packed short ones


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    make_hf_model(tie=False, dtype=torch.float64, seed=5).save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(model, d, cfg)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(LENS, CHUNK)
    # Two padding micro-steps at the end, as a data-parallel rank with fewer chunks gets.
    batch = assemble_step(plan.chunks, seqs, targets, LENS, list(range(len(seqs))), n_label, 0, len(plan.chunks),
                          pad_to=len(plan.chunks) + 2)
    assert batch.chunks[-1].num_tokens == 0
    return model, batch


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 2, 8])
def test_one_stage_step_is_bit_identical_to_algorithm_2_on_the_executor(setup, k):
    """What ChunkFlowStrategy ran for pp = 1 before the runner (the single-device order on one executor)."""
    model, batch = setup
    model.zero_grad(set_to_none=True)
    oracle = ChunkExecutor(model, batch, torch.device("cpu")).run(
        plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k))
    want = grads(model)
    model.zero_grad(set_to_none=True)
    run = StepRunner(model.cfg, k, "cpu").run(model, batch)
    got = grads(model)
    assert all(torch.equal(got[n], want[n]) for n in want)  # bits, not a tolerance
    assert run.stats.loss_sum == oracle.loss_sum and run.stats.tokens == oracle.tokens == sum(LENS)
    assert run.stats.recomputed_chunks == oracle.recomputed_chunks == len(run.recomputed)
    assert run.plan.pp == 1 and run.plan.caps == (k,) and run.stats.max_live_activations <= k


def test_recorded_step_is_its_plan(setup):
    model, batch = setup
    model.zero_grad(set_to_none=True)
    run = StepRunner(model.cfg, 1, "cpu", rank=3, dp_rank=1).run(model, batch, record=True)
    tl = run.timeline
    assert (tl.rank, tl.stage, tl.dp_rank, tl.step, tl.cap) == (3, 0, 1, batch.step_index, 1)
    assert [(op, c) for op, c, _, _ in tl.events] == [(a.op.value, a.chunk) for a in run.plan.stages[0]]
    assert all(t0 <= t1 for _, _, t0, t1 in tl.events) and tl.peak_live == run.stats.max_live_activations
    assert tl.extra["plan"] is run.plan and tl.plan_text == run.plan.text()
    assert run.recomputed == [a.chunk for a in run.plan.stages[0] if a.op is Op.RECOMPUTE] != []
    model.zero_grad(set_to_none=True)
    assert StepRunner(model.cfg, 1, "cpu").run(model, batch).timeline is None  # recording is opt-in


def test_more_live_chunks_than_the_plan_allows_is_an_error(setup):
    class TightCaps(StepRunner):  # a plan whose cap the executor cannot keep: what a runtime bug looks like
        def plan(self, batch):
            return replace(super().plan(batch), caps=(1,))

    model, batch = setup
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"rank 0, stage 0: 2 chunks held activations at once, above the "
                                           r"plan's cap 1 \(a runtime bug\)"):
        TightCaps(model.cfg, 2, "cpu").run(model, batch)


def test_runner_arguments_are_checked(setup):
    cfg = setup[0].cfg
    with pytest.raises(ValueError, match="needs a transport"):
        StepRunner(cfg, 1, "cpu", stage=0, pp=2)
    with pytest.raises(ValueError, match="stage 2 is not one of the pipeline's 2 stages"):
        StepRunner(cfg, 1, "cpu", stage=2, pp=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        StepRunner(cfg, 0, "cpu")
