"""State-aware chunk execution gives exactly the gradient of whole-sequence training (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, to_hf_name
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.planner import plan_single_device

CHUNK = 16
LENS = [5, 40, 13, 1, 320, 33, 16, 17]  # short ones, 2x-20x CHUNK, exactly CHUNK, CHUNK + 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(tie=False, dtype=torch.float64, seed=3)
    hf.save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(model, d, cfg)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    labels = [s.clone() for s in seqs]
    labels[1][:10] = -100  # an unsupervised prompt
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    n_label = sum(int((t != -100).sum()) for t in targets)
    # Reference: transformers on each whole sequence, loss = summed CE / supervised tokens.
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    ref = {name: hf.get_parameter(to_hf_name(name)).grad.clone() for name, _ in model.named_parameters()}
    return model, seqs, targets, n_label, ref, float(total)


def chunked_grads(model, seqs, targets, n_label, chunk_size, k, offload=False):
    plan = build_chunk_plan([len(s) for s in seqs], chunk_size)
    batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))), n_label, 0,
                          len(plan.chunks))
    model.zero_grad()
    actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k)
    stats = ChunkExecutor(model, batch, torch.device("cpu"), offload_state=offload).run(actions)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def assert_same(got, ref, rtol=1e-10):
    for name, g in got.items():
        err = (g - ref[name]).norm() / ref[name].norm().clamp_min(1e-300)
        assert err < rtol, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("chunk_size", [16, 24, 64, 320])
def test_any_chunk_size_matches_transformers(setup, chunk_size):
    model, seqs, targets, n_label, ref, total = setup
    got, stats = chunked_grads(model, seqs, targets, n_label, chunk_size, k=1)
    assert_same(got, ref)
    assert stats.loss_sum == pytest.approx(total, rel=1e-12)
    assert stats.tokens == sum(LENS)


def test_every_k_and_offload_give_the_same_gradient(setup):
    model, seqs, targets, n_label, ref, _ = setup
    chain = -(-max(LENS) // CHUNK)
    for k in range(1, chain + 1, 4):
        got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=k)
        assert_same(got, ref)
        assert stats.max_live_activations <= k
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=chain)
    assert_same(got, ref)
    assert stats.recomputed_chunks == 0
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=2, offload=True)
    assert_same(got, ref)
    _, kept = chunked_grads(model, seqs, targets, n_label, CHUNK, k=2)
    assert stats.peak_state_bytes == kept.peak_state_bytes  # offloading moves the state, it does not resize it
    cfg = model.cfg  # at least the float64 keys and values of the longest split sequence, every layer
    assert stats.peak_state_bytes >= max(LENS) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 8


def test_recompute_is_bit_identical(setup):
    """k=1 (recompute everything) and k=chain length (recompute nothing) agree bit for bit."""
    model, seqs, targets, n_label, _, _ = setup
    a, sa = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1)
    b, sb = chunked_grads(model, seqs, targets, n_label, CHUNK, k=100)
    assert sa.recomputed_chunks > 0 and sb.recomputed_chunks == 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_flash_path_through_the_executor_matches_transformers(setup, monkeypatch):
    """model.attention=flash (flash-attn's contract, on CPU through ``flash_standin``) gives the transformers
    gradient, with recompute and state offload; the batch holds a chunk with two prefixed one-token tails
    among unprefixed segments. (On CPU, offload keeps the same storage: the GPU check measures the rest.)"""
    import flash_standin

    calls = flash_standin.install(monkeypatch)
    model, seqs, targets, n_label, ref, total = setup
    monkeypatch.setattr(model, "attention_backend", "flash")
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1, offload=True)
    assert_same(got, ref)
    assert stats.loss_sum == pytest.approx(total, rel=1e-12)
    # chunk [2[0:13) 3[0:1) 5[32:33) 7[16:17)]: one causal call over its 4 segments, one unmasked call per
    # tail (1 query x 2 heads per kv head against a 32- and a 16-token prefix), forward and backward
    assert {(c["op"], c["batch"]) for c in calls if c["causal"] and c["rows"] == 16} >= {("fwd", 4), ("bwd", 4)}
    assert {(c["op"], c["rows"], c["keys"]) for c in calls if not c["causal"]} >= {("fwd", 2, 32), ("fwd", 2, 16),
                                                                                  ("bwd", 2, 32), ("bwd", 2, 16)}


def test_kv_only_forward_gives_the_same_state_bits(setup):
    # A dropped forward fills the state store through kv_only (the last layer stops after k/v): the keys and
    # values must be exactly those of the full forward, which the recompute of that chunk produces.
    model = setup[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (12,), generator=g)
    meta = VarlenMeta.from_lengths([12], [20])
    prefix = [tuple(torch.randn(20, model.cfg.num_kv_heads, model.cfg.head_dim, generator=g, dtype=torch.float64)
                    for _ in range(2)) for _ in model.layer_names]
    with torch.no_grad():
        full_h, full_kv = model(ids, torch.arange(20, 32), meta, prefix, return_kv=True)
        none_h, kv = model(ids, torch.arange(20, 32), meta, prefix, return_kv=True, kv_only=True)
    assert none_h is None and full_h is not None
    assert len(kv) == len(full_kv) == len(model.layer_names)
    for (k, v), (fk, fv) in zip(kv, full_kv):
        assert torch.equal(k, fk) and torch.equal(v, fv)
    with pytest.raises(ValueError, match="kv_only needs return_kv"):
        model(ids, torch.arange(20, 32), meta, prefix, kv_only=True)
