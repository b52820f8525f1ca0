"""Split backward at run time (``parallel.split_backward``): B computes input and key/value state gradients, a later
W the linear weights' gradients, and the step's gradient is the unsplit one (float64), whatever W's place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from single_device_oracle import plan_single_device

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, to_hf_name
from chunkflow_pl.model.split_linear import SplitLinear, WeightGradStash, apply_split_linear
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.pipeline_actions import Action, Op

CHUNK = 16
LENS = [5, 40, 13, 70, 16, 17]  # standalone chunks, chains of 3 and 5 chunks (k=1: recomputed), CHUNK + 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(tie=False, dtype=torch.float64, seed=5)
    hf.save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    plain = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(plain, d, cfg)
    split = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(split, d, cfg)
    assert apply_split_linear(split) == 7 * cfg.num_layers
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    labels = [s.clone() for s in seqs]
    labels[1][:10] = -100
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    n_label = sum(int((t != -100).sum()) for t in targets)
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    ref = {name: hf.get_parameter(to_hf_name(name)).grad.clone() for name, _ in plain.named_parameters()}
    plan = build_chunk_plan(LENS, CHUNK)
    batch = assemble_step(plan.chunks, seqs, targets, LENS, list(range(len(seqs))), n_label, 0, len(plan.chunks))
    return plain, split, batch, ref


def grads(model, batch, actions):
    model.zero_grad(set_to_none=True)
    stats = ChunkExecutor(model, batch, torch.device("cpu")).run(actions)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def unsplit(batch, k):
    return plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k)


def split_plan(batch, k, where: str):
    """The unsplit order with every B split; W placed: ``end`` (all at the end, B order), ``reversed`` (all at the
    end, reverse B order), ``lag`` (W of a chunk right after the next chunk's B; the last at the end)."""
    acts, ws = [], []
    for a in unsplit(batch, k):
        if a.op is not Op.BACKWARD:
            acts.append(a)
            continue
        acts.append(Action(Op.BACKWARD, a.chunk, split=True))
        if where == "lag":
            acts += [Action(Op.WEIGHT, c) for c in ws]
            ws = []
        ws.append(a.chunk)
    return acts + [Action(Op.WEIGHT, c) for c in (reversed(ws) if where == "reversed" else ws)]


def rel_err(got, ref):
    return max(float((got[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-300)) for n in ref)


@pytest.mark.parametrize("k", [1, 64])  # 64: every chunk kept
def test_deferred_weight_gradients_equal_unsplit_and_transformers(setup, k):
    plain, split, batch, ref = setup
    base, _ = grads(plain, batch, unsplit(batch, k))
    same_model, base_stats = grads(split, batch, unsplit(batch, k))
    assert (base_stats.recomputed_chunks > 0) == (k == 1)  # k=1: chains are recomputed
    assert rel_err(base, ref) < 1e-10 and rel_err(same_model, base) < 1e-12
    for where in ("end", "lag", "reversed"):
        got, stats = grads(split, batch, split_plan(batch, k, where))
        assert rel_err(got, ref) < 1e-10, where
        assert rel_err(got, base) < 1e-12, where
        if where != "reversed":  # every weight's chunk gradients summed in the unsplit order: the same bits
            assert all(torch.equal(got[n], same_model[n]) for n in got), where
        assert stats.recomputed_chunks == base_stats.recomputed_chunks
    # W at the end: every chunk holds its slot until then
    assert grads(split, batch, split_plan(batch, k, "end"))[1].max_live_activations == len(batch.chunks)


def test_split_backward_defers_exactly_the_linear_weights(setup):
    _, split, batch, _ = setup
    acts = [a for a in split_plan(batch, 1, "end") if a.op is not Op.WEIGHT]
    split.zero_grad(set_to_none=True)
    ex = ChunkExecutor(split, batch, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="awaiting their weight action"):
        ex.run(acts)
    linear = {f"{n}.weight" for n, m in split.named_modules() if isinstance(m, SplitLinear)}
    for n, p in split.named_parameters():
        assert (p.grad is None) == (n in linear), n  # biases, norms, embedding, head: in B
    assert sum(len(s) for s in ex._awaiting_w.values()) == len(linear) * len(batch.chunks)


def test_weight_without_its_split_backward_is_refused(setup):
    plain, split, batch, _ = setup
    acts = unsplit(batch, 1)
    i = next(i for i, a in enumerate(acts) if a.op is Op.BACKWARD)
    with pytest.raises(RuntimeError, match="without a pending split backward"):
        ChunkExecutor(split, batch, torch.device("cpu")).run(acts[:i + 1] + [Action(Op.WEIGHT, acts[i].chunk)])
    with pytest.raises(ValueError, match="parallel.split_backward"):
        ChunkExecutor(plain, batch, torch.device("cpu")).run(split_plan(batch, 1, "lag"))


@pytest.mark.parametrize("mutation", ["skipped", "twice"])
def test_a_lost_or_doubled_weight_gradient_fails_the_comparison(setup, monkeypatch, mutation):
    """The comparison above catches a W that adds nothing or adds twice (the mutation the runtime cannot see)."""
    _, split, batch, ref = setup
    flush, calls = WeightGradStash.flush, []

    def mutated(self):  # the step's first W: lost, or run twice
        calls.append(1)
        if len(calls) == 1:
            if mutation == "twice":
                self.entries = self.entries * 2
            else:
                self.entries = []
        flush(self)

    monkeypatch.setattr(WeightGradStash, "flush", mutated)
    got, _ = grads(split, batch, split_plan(batch, 1, "lag"))
    assert len(calls) == len(batch.chunks) and rel_err(got, ref) > 1e-3
