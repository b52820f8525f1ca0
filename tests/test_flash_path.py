"""The flash-attn code path, run on CPU through a stand-in that asserts flash-attn's contract (float64), for
flash-attn 2 and flash-attn-4 (``flash_attn.cute``) alike.

The stand-in (``flash_standin.py``) computes what the CUDA kernels compute, from the inputs they are
given, so these tests pin everything chunkflow_pl does around the kernels: block split, per-segment
prefix assignment, GQA folding, cu_seqlens, LSE layout and merge, and the custom backward.
"""

from __future__ import annotations

import sys
import types

import flash_standin
import pytest
import torch
from test_attention import naive

from chunkflow_pl.model.attention import VarlenMeta, attention
from chunkflow_pl.model.attention_kernels import CpuFusedKernels, VarlenBlock
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder

LAYOUTS = {  # name: (query lengths, prefix lengths) per segment
    "no-prefix": ([5, 3, 7], [0, 0, 0]),
    "one-prefix": ([6], [9]),
    "two-prefixed-tails": ([4, 3, 5], [7, 0, 11]),
    "zero-length-segments": ([0, 4, 0, 3], [5, 6, 0, 2]),
    "one-token-tail": ([1, 3], [12, 0]),
}


@pytest.fixture(params=["flash-attn", "flash-attn-4"])
def standin(request, monkeypatch):
    """Each flash-path test runs through both packages' contracts (``backend="flash"`` picks the one installed)."""
    calls = (flash_standin.install_cute if request.param == "flash-attn-4" else flash_standin.install)(monkeypatch)
    assert get_kernels_for_flash().name == request.param
    return calls


def get_kernels_for_flash():
    from chunkflow_pl.model.attention_kernels import select_kernels

    return select_kernels("flash", torch.device("cpu"), torch.float64)


def inputs(lens, pre, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    P = sum(p for q, p in zip(lens, pre) if q)  # prefixes of segments that have queries
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()  # noqa: E731
    return mk(T, heads, dim), mk(T, kv_heads, dim), mk(T, kv_heads, dim), mk(P, kv_heads, dim), mk(P, kv_heads, dim)


def grads(out, tensors, seed=1):
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True, materialize_grads=True)


def naive_used(q, k, v, pk, pv, lens, pre):
    """The explicit-mask reference with the prefix convention of ``attention`` (segments with queries)."""
    keep = [i for i, n in enumerate(lens) if n]
    return naive(q, k, v, [lens[i] for i in keep], [pre[i] for i in keep], pk, pv)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_flash_path_equals_reference_forward_and_every_gradient(standin, layout, kv_heads):
    lens, pre = LAYOUTS[layout]
    q, k, v, pk, pv = inputs(lens, pre, kv_heads=kv_heads)
    meta = VarlenMeta.from_lengths(lens, pre)
    has_prefix = pk.shape[0] > 0
    out = attention(q, k, v, meta, pk if has_prefix else None, pv if has_prefix else None, backend="flash")
    ref = naive_used(q, k, v, pk, pv, lens, pre)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert {c["op"] for c in standin} == {"fwd"}  # the flash path ran, through the stand-in
    for a, b in zip(grads(out, [q, k, v, pk, pv]), grads(ref, [q, k, v, pk, pv])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert {c["op"] for c in standin} == {"fwd", "bwd"}
    assert all(c["rows"] > 0 and c["keys"] > 0 for c in standin)  # no kernel call over an empty range


def test_prefix_as_per_segment_views_equals_the_concatenation(standin):
    lens, pre = LAYOUTS["two-prefixed-tails"]
    q, k, v, pk, pv = inputs(lens, pre)
    meta = VarlenMeta.from_lengths(lens, pre)
    cat = attention(q, k, v, meta, pk, pv, backend="flash")
    views = attention(q, k, v, meta, (pk[:7], pk[7:]), (pv[:7], pv[7:]), backend="flash")
    assert torch.equal(cat, views)
    with pytest.raises(ValueError, match="prefix lengths"):
        attention(q, k, v, meta, (pk[:11], pk[11:]), (pv[:11], pv[11:]), backend="flash")


def test_one_kernel_call_per_block_and_cu_seqlens_built_once_per_chunk(standin):
    """Two layers, three segments, two of them with a prefix: per layer one causal call over all segments
    and one unmasked call per prefixed segment, all layers reusing the same cu_seqlens tensors."""
    cfg = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=2)
    model = Qwen2Decoder(cfg, attention_backend="flash").double()
    lens, pre = [4, 3, 5], [7, 0, 11]
    meta = VarlenMeta.from_lengths(lens, pre)
    ids = torch.randint(0, 32, (12,))
    pos = torch.cat([torch.arange(p, p + n) for n, p in zip(lens, pre)])
    prefix = [((torch.randn(7, 2, 8, dtype=torch.float64), torch.randn(11, 2, 8, dtype=torch.float64)),
               (torch.randn(7, 2, 8, dtype=torch.float64), torch.randn(11, 2, 8, dtype=torch.float64)))
              for _ in range(2)]
    model(ids, pos, meta, prefix)
    causal = [c for c in standin if c["causal"]]
    unmasked = [c for c in standin if not c["causal"]]
    assert [(c["batch"], c["rows"]) for c in causal] == [(3, 12)] * 2
    assert [(c["batch"], c["rows"], c["keys"]) for c in unmasked] == [(1, 8, 7), (1, 10, 11)] * 2  # 2 groups
    assert causal[0]["cu_q"] is causal[1]["cu_q"] and unmasked[0]["cu_k"] is unmasked[2]["cu_k"]


def test_no_nan_when_segments_have_no_prefix_or_no_tokens(standin):
    q, k, v, pk, pv = inputs([0, 2, 0], [3, 0, 0])
    out = attention(q, k, v, VarlenMeta.from_lengths([0, 2, 0], [3, 0, 0]), None, None, backend="flash")
    assert out.shape == (2, 4, 8) and not out.isnan().any()
    torch.testing.assert_close(out, naive_used(q, k, v, pk, pv, [0, 2, 0], [3, 0, 0]), rtol=1e-12, atol=1e-12)
    assert [(c["causal"], c["batch"], c["rows"]) for c in standin] == [(True, 1, 2)]


def test_the_standin_asserts_flash_attn_preconditions():
    """The stand-in is only worth running through if it rejects what the real kernels reject."""
    q, k, v = (torch.randn(6, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    fwd = flash_standin._flash_attn_varlen_forward
    fwd(q, k, v, cu, cu, 6, 6, 0.0, 0.5, True)  # valid
    bad = [
        ((q, k, v, cu.long(), cu, 6, 6, 0.0, 0.5, True), "int32"),
        ((q, k, v, cu, cu, torch.tensor(6), 6, 0.0, 0.5, True), "Python int"),
        ((q, k, v, cu, cu, 5, 6, 0.0, 0.5, True), "longest segment"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu, cu, 6, 6, 0.0, 0.5, True), "contiguous last"),
        ((q.float(), k.float(), v.float(), cu, cu, 6, 6, 0.0, 0.5, True), "no torch.float32 kernels"),
        ((torch.randn(6, 3, 8, dtype=torch.float64), k, v, cu, cu, 6, 6, 0.0, 0.5, True), "divide"),
        ((q, k, v, cu.to(torch.int32)[None], cu, 6, 6, 0.0, 0.5, True), "1-D"),
    ]
    for args, message in bad:
        with pytest.raises(AssertionError, match=message):
            fwd(*args)


def test_standin_is_bottom_right_causal_like_the_cpu_reference_kernel():
    """Cross-check the stand-in itself against PyTorch's fused CPU kernel on a block with Lq == Lk, and its
    bottom-right alignment on Lq < Lk (first query sees all but the last Lq - 1 keys)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(9, 2, 8, dtype=torch.float64) for _ in range(3))
    blk = VarlenBlock([4, 5], [4, 5])
    o_ref, lse_ref, _ = CpuFusedKernels().forward(q, k, v, blk, True, 0.3)
    o, lse, _, _ = flash_standin._flash_attn_varlen_forward(q, k, v, blk.cu_q("cpu"), blk.cu_k("cpu"), 5, 5, 0.0,
                                                            0.3, True)
    torch.testing.assert_close(o, o_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-13, atol=1e-13)
    cu_q, cu_k = torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    o, lse, _, _ = flash_standin._flash_attn_varlen_forward(q[:2], k[:5], v[:5], cu_q, cu_k, 2, 5, 0.0, 0.3, True)
    expected = torch.logsumexp(torch.einsum("hd,khd->hk", q[0], k[:4]) * 0.3, -1)
    torch.testing.assert_close(lse[:, 0], expected)


class PaddedLseKernels(CpuFusedKernels):
    """The CPU kernels with the LSE in the padded [B, Hq, ceil32(max_q)] layout of PyTorch's memory-efficient
    CUDA kernel (and of older flash builds); padding holds NaN, so reading it anywhere poisons the result."""

    name = "cpu-fused-padded-lse"

    def forward(self, q, k, v, blk, causal, scale):
        o, rows, aux = super().forward(q, k, v, blk, causal, scale)
        padded = torch.full((len(blk), rows.shape[0], -(-blk.max_q // 32) * 32), float("nan"), dtype=rows.dtype)
        for b, (s, e) in enumerate(zip(blk.cu_q_list, blk.cu_q_list[1:])):
            padded[b, :, : e - s] = rows[:, s:e]
        return o, padded, aux

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        assert lse.shape == (len(blk), q.shape[1], -(-blk.max_q // 32) * 32)
        rows = torch.cat([lse[b, :, : e - s] for b, (s, e) in enumerate(zip(blk.cu_q_list, blk.cu_q_list[1:]))], 1)
        return super().backward(do, q, k, v, o, rows, aux, blk, causal, scale)


@pytest.mark.parametrize("layout", ["two-prefixed-tails", "zero-length-segments", "no-prefix"])
def test_padded_lse_layout_round_trips_through_the_block_attention(layout):
    from chunkflow_pl.model.attention import block_attention

    lens, pre = LAYOUTS[layout]
    q, k, v, pk, pv = inputs(lens, pre)
    has_prefix = pk.shape[0] > 0
    meta = VarlenMeta.from_lengths(lens, pre)
    out = block_attention(q, k, v, meta, pk if has_prefix else None, pv if has_prefix else None, PaddedLseKernels())
    ref = naive_used(q, k, v, pk, pv, lens, pre)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(out, [q, k, v, pk, pv]), grads(ref, [q, k, v, pk, pv])):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_flash_prefers_flash_attn_4_then_flash_attn_2_and_names_both_when_neither(monkeypatch):
    from chunkflow_pl.model.attention_kernels import flash_kernel_name

    cpu = torch.device("cpu")
    flash_standin.install(monkeypatch)
    assert flash_kernel_name(cpu) == "flash-attn"
    # both installed: flash-attn-4 wins (its module tree replaces flash-attn 2's bare stand-in module)
    flash_standin.install_cute(monkeypatch)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", types.SimpleNamespace(
        _flash_attn_varlen_forward=flash_standin._flash_attn_varlen_forward,
        _flash_attn_varlen_backward=flash_standin._flash_attn_varlen_backward))
    sys.modules["flash_attn"].__version__ = "2.8.3"
    assert flash_kernel_name(cpu) == "flash-attn-4"
    for name in ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface", "flash_attn.flash_attn_interface"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: "import X" raises ImportError
    with pytest.raises(ImportError, match=r"flash-attn-4.*4\.0\.0b36.*flash-attn >= 2\.7.*model\.attention=sdpa"):
        flash_kernel_name(cpu)


def test_the_standin_asserts_flash_attn_4_preconditions():
    """flash-attn-4's own asserts (interface.py), kept by the stand-in, so the adapter cannot drift from them."""
    q, k, v = (torch.randn(6, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 6], dtype=torch.int32)
    fwd, bwd = flash_standin._flash_attn_fwd, flash_standin._flash_attn_bwd
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6, softmax_scale=0.5, causal=True)
    o, lse, *_ = fwd(q, k, v, **kw, return_lse=True)
    assert lse.shape == (2, 6)
    assert fwd(q, k, v, **kw)[1] is None  # no return_lse, nothing requiring grad: no LSE comes back
    do = torch.randn_like(o)
    bkw = {x: kw[x] for x in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")}
    bwd(q, k, v, o, do, lse, 0.5, True, **bkw)  # valid
    bad_fwd = [
        (dict(kw, cu_seqlens_q=cu.long()), "int32"),
        (dict(kw, max_seqlen_q=5), "longest segment"),
        (dict(kw, window_size_left=-1, window_size_right=-1), None),
        (dict(kw, softmax_scale=None), None),
    ]
    for args, message in bad_fwd:
        with pytest.raises(AssertionError, match=message):
            fwd(q, k, v, **args, return_lse=True)
    with pytest.raises(AssertionError, match="float16/bfloat16"):
        fwd(q.float(), k.float(), v.float(), **kw, return_lse=True)
    with pytest.raises(AssertionError, match="head_dim"):
        fwd(*(torch.randn(6, 2, 7, dtype=torch.float64) for _ in range(3)), **kw, return_lse=True)
    bad_bwd = [
        ((q, k, v, o, do, lse.t().contiguous()), "lse must have shape"),
        ((q, k, v, o, do, lse.float()), "lse must be float32"),
        ((q, k, v, o, do[:5], lse), "out/dout"),
    ]
    for args, message in bad_bwd:
        with pytest.raises(AssertionError, match=message):
            bwd(*args, 0.5, True, **bkw)
