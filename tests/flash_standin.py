"""A CPU stand-in for flash-attn's varlen kernels: their contract, asserted, in exact float64 arithmetic.

``_flash_attn_varlen_forward`` / ``_flash_attn_varlen_backward`` of ``flash_attn.flash_attn_interface``
(flash-attn >= 2.7, the signatures ``attention_kernels.FlashAttnKernels`` calls). What the real kernels
require or do, this module asserts or does:

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

    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for qs, qe, ks, ke in segs:
        if qe == qs or ke == ks:
            continue
        _, _, vv, s = _probs_inputs(q, k, v, qs, qe, ks, ke, causal, softmax_scale)
        m = torch.logsumexp(s, dim=-1)  # [H, Lq]; -inf where no key is visible
        p = torch.exp(s - m[..., None]).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, vv).to(q.dtype)
        lse[:, qs:qe] = torch.where(torch.isfinite(m), m, torch.full_like(m, float("inf"))).to(lse.dtype)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.zeros(2, dtype=torch.int64)


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

    g = q.shape[1] // k.shape[1]
    dq.zero_()
    dk.zero_()
    dv.zero_()
    delta = torch.zeros(q.shape[1], q.shape[0] + 128 * len(segs), dtype=torch.float32)
    for qs, qe, ks, ke in segs:
        if qe == qs or ke == ks:
            continue
        qq, kk, vv, s = _probs_inputs(q, k, v, qs, qe, ks, ke, causal, softmax_scale)
        p = torch.exp(s - softmax_lse[:, qs:qe, None].double())  # the GIVEN lse: 0 where lse = +inf
        do_ = dout[qs:qe].double()
        d = (do_ * out[qs:qe].double()).sum(-1).transpose(0, 1)  # the GIVEN out
        ds = p * (torch.einsum("qhd,khd->hqk", do_, vv) - d[..., None]) * softmax_scale
        dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kk).to(dq.dtype)
        dk_h = torch.einsum("hqk,qhd->khd", ds, qq)
        dv_h = torch.einsum("hqk,qhd->khd", p, do_)
        L, H, D = dk_h.shape
        dk[ks:ke] = dk_h.view(L, H // g, g, D).sum(2).to(dk.dtype)
        dv[ks:ke] = dv_h.view(L, H // g, g, D).sum(2).to(dv.dtype)
    return delta


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
