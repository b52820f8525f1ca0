"""A CPU stand-in for flash-attn's varlen kernels: their contract, asserted, in exact float64 arithmetic.

Two packages, one math (``_forward_math`` / ``_backward_math``):

- flash-attn 2: ``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward`` of
  ``flash_attn.flash_attn_interface`` (>= 2.7, what ``attention_kernels.FlashAttnKernels`` calls);
  ``install(monkeypatch)``;
- flash-attn-4: ``_flash_attn_fwd`` / ``_flash_attn_bwd`` of ``flash_attn.cute.interface`` (4.0.0b36, what
  ``FlashAttn4Kernels`` calls; read from the wheel's ``interface.py``): keyword options, backward takes
  ``(q, k, v, out, dout, lse, ...)`` (out BEFORE dout) and returns new dq/dk/dv, the LSE comes back only with
  ``return_lse=True`` (or inputs that require grad), head_dim in [8, 256] divisible by 16 bytes,
  ``cu_seqlens`` of shape (B + 1,); ``install_cute(monkeypatch)``.

What the real kernels require or do, this module asserts or does:

- q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, ``Hq % Hkv == 0`` (GQA: query head h reads kv head
  ``h // (Hq / Hkv)``), last dimension contiguous (the kernels read strided rows and heads, nothing else);
- ``cu_seqlens_q/k``: int32, 1-D, contiguous, on the device of q, ``B + 1`` entries from 0, non-decreasing;
- ``max_seqlen_q/k``: Python ints, at least the longest segment (they size the launch grid: a smaller
  value silently skips rows on a GPU);
- causal masks are bottom-right aligned: query i of a segment with Lq queries and Lk keys sees keys
  ``0 .. i + Lk - Lq``;
- ``softmax_lse`` is ``[Hq, total_q]`` float32 (unpadded layout); a row with no visible key (empty key
  range, or masked out) gets output 0 and lse = +inf, as the CUDA kernels write it;
- the backward recomputes probabilities from the *given* lse and the delta ``rowsum(dout * out)`` from
  the *given* out, and writes dq/dk/dv into the preallocated tensors (GQA: dk/dv summed per kv head).

One deliberate difference: float64 inputs are accepted (with a float64 lse), so the flash code path can
be checked against the float64 reference to rounding; the real kernels take bf16/fp16 only.

``install(monkeypatch)`` makes ``import flash_attn`` find this module; ``CALLS`` records every call.
"""

from __future__ import annotations

import sys
import types

import torch

__version__ = "2.8.3"
CALLS: list[dict] = []
HALF = (torch.float16, torch.bfloat16)


def _check_qkv(q, k, v):
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [total, heads, head_dim]"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share one dtype"
    assert q.dtype in HALF or q.dtype == torch.float64, f"flash-attn has no {q.dtype} kernels"
    assert q.device == k.device == v.device, "q, k, v on one device"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    assert k.shape == v.shape and k.shape[2] == q.shape[2], "k/v shapes"
    assert q.shape[1] % k.shape[1] == 0, "number of kv heads must divide the number of query heads"
    assert q.shape[2] <= 256, "head dim <= 256"


def _check_cu(cu, name, total, device):
    assert isinstance(cu, torch.Tensor) and cu.dtype == torch.int32, f"{name} must be an int32 tensor"
    assert cu.device == device, f"{name} must be on the device of q ({device}), got {cu.device}"
    assert cu.dim() == 1 and cu.is_contiguous(), f"{name} must be 1-D and contiguous"
    c = cu.tolist()
    assert c[0] == 0 and all(a <= b for a, b in zip(c, c[1:])), f"{name} must start at 0 and not decrease: {c}"
    assert c[-1] <= total, f"{name} ends at {c[-1]} beyond the {total} rows given"
    return c


def _check_max(value, name, lens):
    assert type(value) is int, f"{name} must be a Python int, got {type(value).__name__}"
    assert value >= max(lens, default=0), f"{name}={value} < longest segment {max(lens)}: rows would be skipped"


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _segments(cu_q, cu_k):
    return [(cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]) for b in range(len(cu_q) - 1)]


def _probs_inputs(q, k, v, qs, qe, ks, ke, causal, scale):
    g = q.shape[1] // k.shape[1]
    qq = q[qs:qe].double()
    kk = k[ks:ke].double().repeat_interleave(g, 1)
    vv = v[ks:ke].double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
    lq, lk = qe - qs, ke - ks
    if causal:
        visible = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)  # bottom-right aligned
        s = s.masked_fill(~visible, float("-inf"))
    return qq, kk, vv, s


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                               alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None):
    _check_qkv(q, k, v)
    cq = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    ck = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    assert len(cq) == len(ck) >= 2, "cu_seqlens_q and cu_seqlens_k: one entry per segment + 1, at least one segment"
    segs = _segments(cq, ck)
    _check_max(max_seqlen_q, "max_seqlen_q", [e - s for s, e, _, _ in segs])
    _check_max(max_seqlen_k, "max_seqlen_k", [e - s for _, _, s, e in segs])
    assert dropout_p == 0.0 and isinstance(softmax_scale, float) and isinstance(causal, bool)
    assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0), "no local attention / softcap"
    assert alibi_slopes is None and not return_softmax and block_table is None
    assert leftpad_k is None and seqused_k is None
    CALLS.append({"op": "fwd", "causal": causal, "batch": len(segs), "rows": q.shape[0], "keys": k.shape[0],
                  "cu_q": cu_seqlens_q, "cu_k": cu_seqlens_k})

    out, lse = _forward_math(q, k, v, segs, causal, softmax_scale)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


def _forward_math(q, k, v, segs, causal, scale):
    """What the forward kernels compute (either package): out, and lse [Hq, Tq] (+inf on rows with no key)."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for qs, qe, ks, ke in segs:
        if qe == qs or ke == ks:
            continue
        _, _, vv, s = _probs_inputs(q, k, v, qs, qe, ks, ke, causal, scale)
        m = torch.logsumexp(s, dim=-1)  # [H, Lq]; -inf where no key is visible
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)
        lse[:, qs:qe] = torch.where(torch.isfinite(m), m, torch.full_like(m, float("inf"))).to(lse.dtype)
    return out, lse


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
                                rng_state=None):
    _check_qkv(q, k, v)
    for name, t, like in (("dout", dout, q), ("out", out, q), ("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert isinstance(t, torch.Tensor), f"{name} must be a preallocated tensor (flash-attn writes into it)"
        assert t.shape == like.shape and t.dtype == like.dtype, f"{name} must match the shape/dtype of its input"
        assert t.stride(-1) == 1, f"{name} must have a contiguous last dimension"
    assert softmax_lse.shape == (q.shape[1], q.shape[0]), f"softmax_lse must be [Hq, total_q], got {softmax_lse.shape}"
    assert softmax_lse.dtype == _lse_dtype(q.dtype) and softmax_lse.device == q.device
    cq = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    ck = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    assert len(cq) == len(ck) >= 2
    segs = _segments(cq, ck)
    _check_max(max_seqlen_q, "max_seqlen_q", [e - s for s, e, _, _ in segs])
    _check_max(max_seqlen_k, "max_seqlen_k", [e - s for _, _, s, e in segs])
    assert dropout_p == 0.0 and isinstance(softmax_scale, float) and isinstance(causal, bool)
    assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0) and alibi_slopes is None
    assert isinstance(deterministic, bool)
    CALLS.append({"op": "bwd", "causal": causal, "batch": len(segs), "rows": q.shape[0], "keys": k.shape[0],
                  "cu_q": cu_seqlens_q, "cu_k": cu_seqlens_k})

    _backward_math(dout, q, k, v, out, softmax_lse, dq, dk, dv, segs, causal, softmax_scale)
    return torch.zeros(q.shape[1], q.shape[0] + 128 * len(segs), dtype=torch.float32)  # softmax_d


def _backward_math(dout, q, k, v, out, lse, dq, dk, dv, segs, causal, scale):
    """What the backward kernels compute: probabilities from the GIVEN lse, delta = rowsum(dout * out) from the
    GIVEN out; dq/dk/dv written into the given tensors (GQA: dk/dv summed per kv head)."""
    g = q.shape[1] // k.shape[1]
    dq.zero_()
    dk.zero_()
    dv.zero_()
    for qs, qe, ks, ke in segs:
        if qe == qs or ke == ks:
            continue
        qq, kk, vv, s = _probs_inputs(q, k, v, qs, qe, ks, ke, causal, scale)
        p = torch.exp(s - lse[:, qs:qe, None].double())  # 0 where lse = +inf
        do_ = dout[qs:qe].double()
        d = (do_ * out[qs:qe].double()).sum(-1).transpose(0, 1)
        ds = p * (torch.einsum("qhd,khd->hqk", do_, vv) - d[..., None]) * scale
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kk).to(dq.dtype)
        dk_h = torch.einsum("hqk,qhd->khd", ds, qq)
        dv_h = torch.einsum("hqk,qhd->khd", p, do_)
        L, H, D = dk_h.shape
        dk[ks:ke] = dk_h.view(L, H // g, g, D).sum(2).to(dk.dtype)
        dv[ks:ke] = dv_h.view(L, H // g, g, D).sum(2).to(dv.dtype)


# ---------------------------------------------------------------------------------------------------------
# flash-attn-4 (``flash_attn.cute.interface``, 4.0.0b36): what ``attention_kernels.FlashAttn4Kernels`` calls
# ---------------------------------------------------------------------------------------------------------


def _check_fa4_qkv(q, k, v):
    assert q is not None and k is not None, "q and k are given (qv/MLA is not used)"
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "varlen q, k, v must be [total, heads, head_dim]"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must have the same dtype"
    assert q.dtype in HALF or q.dtype == torch.float64, f"flash-attn-4 trains with float16/bfloat16, not {q.dtype}"
    assert q.shape[1] % k.shape[1] == 0, "num_head must be divisible by num_head_kv"
    assert k.shape == v.shape and k.shape[2] == q.shape[2], "k/v shapes"
    align = 16 // q.element_size()
    assert 8 <= q.shape[2] <= 256 and q.shape[2] % align == 0, f"head_dim in [8, 256] divisible by {align} (sm90)"


def _check_fa4_cu(cu, name, total, device):
    assert cu is not None, f"{name}: the adapter runs the varlen kernels"
    assert cu.stride(0) == 1, f"{name} must be contiguous"
    return _check_cu(cu, name, total, device)


def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None, page_table=None, softmax_scale=None,
                    causal=False, softcap=None, window_size_left=None, window_size_right=None, learnable_sink=None,
                    tile_mn=None, mma_pv_is_rs=None, intra_wg_overlap=None, num_threads=384, num_splits=1,
                    pack_gqa=None, _arch=None, score_mod=None, mask_mod=None, block_sparse_tensors=None,
                    return_lse=False, out=None, lse=None, **rest):
    _check_fa4_qkv(q, k, v)
    assert qv is None and page_table is None and learnable_sink is None and block_sparse_tensors is None
    assert score_mod is None and mask_mod is None and seqused_q is None and seqused_k is None
    assert (window_size_left, window_size_right) == (None, None) and softcap in (None, 0.0)
    assert out is None and lse is None and num_splits == 1 and not rest, f"unexpected options {sorted(rest)}"
    cq = _check_fa4_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    ck = _check_fa4_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    assert len(cq) == len(ck) >= 2, "cu_seqlens_k must have shape (batch_size + 1,)"
    segs = _segments(cq, ck)
    _check_max(max_seqlen_q, "max_seqlen_q", [e - s for s, e, _, _ in segs])
    _check_max(max_seqlen_k, "max_seqlen_k", [e - s for _, _, s, e in segs])
    assert isinstance(softmax_scale, float) and isinstance(causal, bool)
    CALLS.append({"op": "fwd", "causal": causal, "batch": len(segs), "rows": q.shape[0], "keys": k.shape[0],
                  "cu_q": cu_seqlens_q, "cu_k": cu_seqlens_k, "package": "flash-attn-4"})
    o, l = _forward_math(q, k, v, segs, causal, softmax_scale)
    needs_lse = return_lse or any(t.requires_grad for t in (q, k, v))
    return o, (l if needs_lse else None), None, None, None  # no LSE unless asked for (as the real one)


def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0, window_size_left=None,
                    window_size_right=None, m_block_size=64, n_block_size=128, num_threads=256, pack_gqa=False,
                    num_stages_Q=2, num_stages_dO=2, SdP_swapAB=False, dKV_swapAB=False, dQ_swapAB=False,
                    AtomLayoutMSdP=2, AtomLayoutNdKV=2, AtomLayoutMdQ=2, V_in_regs=False, cu_seqlens_q=None,
                    cu_seqlens_k=None, seqused_q=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    deterministic=False, dq=None, dk=None, dv=None, score_mod=None, score_mod_bwd=None,
                    mask_mod=None, aux_tensors=None, aux_scalars=None, block_sparse_tensors=None, dlse=None,
                    learnable_sink=None):
    _check_fa4_qkv(q, k, v)
    total_q, heads = q.shape[0], q.shape[1]
    assert out.shape == (total_q, heads, v.shape[2]) and dout.shape == out.shape, "out/dout: [total_q, Hq, D]"
    assert q.dtype == out.dtype == dout.dtype, "inputs must have the same dtype"
    assert lse.shape == (heads, total_q), "lse must have shape (num_head, total_q)"
    assert lse.dtype == _lse_dtype(q.dtype), "lse must be float32"
    assert softcap in (None, 0.0) and (window_size_left, window_size_right) == (None, None)
    assert score_mod is None and mask_mod is None and dlse is None and learnable_sink is None
    assert seqused_q is None and seqused_k is None and block_sparse_tensors is None
    cq = _check_fa4_cu(cu_seqlens_q, "cu_seqlens_q", total_q, q.device)
    ck = _check_fa4_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device)
    assert len(cq) == len(ck) >= 2
    segs = _segments(cq, ck)
    _check_max(max_seqlen_q, "max_seqlen_q", [e - s for s, e, _, _ in segs])
    _check_max(max_seqlen_k, "max_seqlen_k", [e - s for _, _, s, e in segs])
    assert isinstance(softmax_scale, float) and isinstance(causal, bool) and isinstance(deterministic, bool)
    CALLS.append({"op": "bwd", "causal": causal, "batch": len(segs), "rows": total_q, "keys": k.shape[0],
                  "cu_q": cu_seqlens_q, "cu_k": cu_seqlens_k, "package": "flash-attn-4"})
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    _backward_math(dout, q, k, v, out, lse, dq, dk, dv, segs, causal, softmax_scale)
    return dq, dk, dv


def install_cute(monkeypatch) -> list[dict]:
    """Make ``flash_attn.cute.interface`` (flash-attn-4's layout: ``flash_attn`` is a bare namespace without
    flash-attn 2's ``flash_attn_interface``) resolve to this module's flash-attn-4 functions."""
    from chunkflow_pl.model import attention_kernels

    pkg = types.ModuleType("flash_attn")
    pkg.__path__ = []  # a package, with nothing importable beneath it but what is set here
    cute = types.ModuleType("flash_attn.cute")
    cute.__path__ = []
    cute.__version__ = "4.0.0b36"
    iface = types.ModuleType("flash_attn.cute.interface")
    iface._flash_attn_fwd = _flash_attn_fwd
    iface._flash_attn_bwd = _flash_attn_bwd
    pkg.cute, cute.interface = cute, iface
    for name, mod in (("flash_attn", pkg), ("flash_attn.cute", cute), ("flash_attn.cute.interface", iface)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "flash_attn.flash_attn_interface", raising=False)
    monkeypatch.setattr(attention_kernels, "_INSTANCES", {})
    CALLS.clear()
    return CALLS


def install(monkeypatch) -> list[dict]:
    """Make ``flash_attn.flash_attn_interface`` resolve to this module (and drop cached kernels)."""
    from chunkflow_pl.model import attention_kernels

    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = __version__
    iface = types.ModuleType("flash_attn.flash_attn_interface")
    iface._flash_attn_varlen_forward = _flash_attn_varlen_forward
    iface._flash_attn_varlen_backward = _flash_attn_varlen_backward
    pkg.flash_attn_interface = iface
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    monkeypatch.setattr(attention_kernels, "_INSTANCES", {})
    CALLS.clear()
    return CALLS
