"""The decoder equals transformers' Qwen2ForCausalLM (weights copied through the real HF name map)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained


def ours_from_hf(hf, tmp_path, dtype, loss_chunk=4096):
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    m = Qwen2Decoder(cfg, loss_chunk=loss_chunk).to(dtype)
    load_pretrained(m, tmp_path, cfg)
    return m


def run_whole(m, ids):
    h, _ = m(ids, torch.arange(len(ids)), VarlenMeta.from_lengths([len(ids)]))
    return h


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tie,heads,kv_heads", [(False, 4, 2), (True, 4, 1), (False, 4, 4)])
def test_logits_and_loss_match_transformers(tmp_path, dtype, tie, heads, kv_heads):
    hf = make_hf_model(tie=tie, dtype=dtype, heads=heads, kv_heads=kv_heads)
    m = ours_from_hf(hf, tmp_path, dtype, loss_chunk=7)
    ids = torch.randint(0, 97, (37,))
    ref = hf(ids[None]).logits[0]
    h = run_whole(m, ids)
    torch.testing.assert_close(m.logits(h), ref, **TOL[dtype])
    tgt = targets_from_labels(ids)
    ref_loss = F.cross_entropy(ref.to(torch.promote_types(dtype, torch.float32)), tgt, reduction="sum")
    torch.testing.assert_close(m.loss_sum(h, tgt), ref_loss, **TOL[dtype])


def test_gradients_match_transformers_float64(tmp_path):
    hf = make_hf_model(tie=False, dtype=torch.float64)
    m = ours_from_hf(hf, tmp_path, torch.float64, loss_chunk=5)
    ids = torch.randint(0, 97, (29,))
    tgt = targets_from_labels(ids)
    F.cross_entropy(hf(ids[None]).logits[0], tgt, reduction="sum").backward()
    m.loss_sum(run_whole(m, ids), tgt).backward()
    from chunkflow_pl.model.hf_io import to_hf_name

    hf_params = dict(hf.named_parameters())
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[to_hf_name(name)].grad, rtol=1e-10, atol=1e-12)


def test_packed_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2)
    m = Qwen2Decoder(cfg).double()
    m.reset_parameters(0.2)
    lens = [7, 1, 19, 4]
    seqs = [torch.randint(0, 53, (n,)) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])
    h_packed, _ = m(torch.cat(seqs), pos, VarlenMeta.from_lengths(lens))
    h_alone = torch.cat([run_whole(m, s) for s in seqs])
    torch.testing.assert_close(h_packed, h_alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [1, 9, 20])
def test_prefix_state_plus_suffix_equals_whole_sequence(split):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=53, hidden_size=32, intermediate_size=40, num_layers=3, num_heads=4, num_kv_heads=2)
    m = Qwen2Decoder(cfg).double()
    m.reset_parameters(0.2)
    ids = torch.randint(0, 53, (21,))
    whole = run_whole(m, ids)
    _, kv = m(ids[:split], torch.arange(split), VarlenMeta.from_lengths([split]), return_kv=True)
    # Suffix of the sequence packed after an unrelated short sequence: only its segment has a prefix.
    other = torch.randint(0, 53, (5,))
    n = len(ids) - split
    meta = VarlenMeta.from_lengths([5, n], [0, split])
    h, _ = m(torch.cat([other, ids[split:]]), torch.cat([torch.arange(5), torch.arange(split, len(ids))]),
             meta, prefix_kv=kv)
    torch.testing.assert_close(h[5:], whole[split:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h[:5], run_whole(m, other), rtol=1e-12, atol=1e-12)


def test_decoder_builds_under_a_default_device_context():
    """Lightning builds the model in ``configure_model`` under ``with torch.device(root_device)``: on a GPU
    every tensor the constructor creates lands on CUDA, the host-side RoPE table must not. The meta device
    stands in for CUDA here."""
    from chunkflow_pl.model.config import get_preset

    with torch.device("meta"):
        m = Qwen2Decoder(get_preset("tiny"))
    assert {p.device.type for p in m.parameters()} == {"meta"}
    cos_TD, _ = m.rope.cos_sin(torch.arange(5), 5, torch.float32)
    torch.testing.assert_close(cos_TD[1, 0], torch.cos(torch.tensor(1.0)))


class _FormulaRMSNorm(torch.nn.Module):
    """transformers' Qwen2RMSNorm, normalising in the input's dtype when that is wider than fp32 (transformers
    casts fp64 down to fp32 there, which the float64 exactness tests cannot afford)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad", [False, True])
def test_rms_norm_is_bit_identical_to_the_formula(dtype, grad):
    # RMSNorm runs through torch's fused rms_norm; the formula (transformers' Qwen2RMSNorm in fp32) is the
    # reference, bit for bit, output and gradients: a kernel that rounds differently would move every run.
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from chunkflow_pl.model.decoder import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g, dtype=dtype) * 3
    w = torch.rand(64, generator=g, dtype=dtype) + 0.5
    refs = [_FormulaRMSNorm(64, 1e-6).to(dtype)] + ([Qwen2RMSNorm(64, eps=1e-6)] if dtype == torch.float32 else [])
    ours = RMSNorm(64, 1e-6).to(dtype)
    for ref in refs:
        with torch.no_grad():
            ours.weight.copy_(w)
            ref.weight.copy_(w)
        ours.weight.grad = None
        xo, xr = x.clone().requires_grad_(grad), x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            yo, yr = ours(xo), ref(xr)
        assert torch.equal(yo, yr)
        if grad:
            dy = torch.randn(yo.shape, generator=g, dtype=dtype)
            yo.backward(dy)
            yr.backward(dy)
            assert torch.equal(xo.grad, xr.grad)
            assert torch.equal(ours.weight.grad, ref.weight.grad)
