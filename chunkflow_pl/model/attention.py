"""Varlen causal attention with an optional per-segment prefix state, behind one interface.

A chunk is a flat token batch (THD: ``T`` tokens, ``H`` heads, ``D`` head dim) of ``B`` segments.
Segment ``b`` has ``Lq_b`` new tokens and attends to ``P_b`` prefix keys/values (earlier tokens of the
same sequence, from the state store) followed by its own keys, causally, bottom-right aligned::

    segment b keys:   [ prefix P_b | own Lq_b ]
    query i sees:     all P_b prefix keys + own keys 0..i        (flash-attn ``causal=True`` semantics)

    q_TND            [T, Hq, D]      all segments' queries, concatenated
    k_TND, v_TND     [T, Hkv, D]     own keys/values (after RoPE)
    prefix_k_PHD     [P, Hkv, D]     prefixes of the segments with P_b > 0, concatenated in segment order

Backends:
- ``sdpa`` (reference, any device): per segment, two fused-kernel calls without an explicit mask
  (prefix block: unmasked; diagonal block: causal), merged by log-sum-exp. Backward calls the
  fused backward kernel per block with the merged output and log-sum-exp, so autograd saves only
  q, k, v, prefix, out and lse: O(chunk) besides the prefix state. No (chunk x prefix) matrix is kept.
- ``flash`` (CUDA): ``flash_attn_varlen_func`` with ``cu_seqlens_k`` counting prefix + own keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

BACKENDS = ("auto", "sdpa", "flash")


@dataclass(frozen=True)
class VarlenMeta:
    """Segment metadata of one chunk. Python lists avoid device syncs in the per-segment loop."""

    seqlens_q: tuple[int, ...]
    prefix_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.seqlens_q) != len(self.prefix_lens):
            raise ValueError("seqlens_q and prefix_lens must have one entry per segment")

    @classmethod
    def from_lengths(cls, seqlens_q, prefix_lens=None) -> VarlenMeta:
        seqlens_q = tuple(int(x) for x in seqlens_q)
        prefix = tuple(int(x) for x in prefix_lens) if prefix_lens is not None else (0,) * len(seqlens_q)
        return cls(seqlens_q, prefix)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens_q)

    @property
    def num_prefix_tokens(self) -> int:
        return sum(self.prefix_lens)

    @cached_property
    def cu_seqlens_q_list(self) -> list[int]:
        out = [0]
        for n in self.seqlens_q:
            out.append(out[-1] + n)
        return out

    @cached_property
    def cu_seqlens_k_list(self) -> list[int]:
        out = [0]
        for n, p in zip(self.seqlens_q, self.prefix_lens):
            out.append(out[-1] + n + p)
        return out


def resolve_backend(name: str, device: torch.device, precision: str = "32-true") -> str:
    """``auto``: flash-attn on CUDA in half precision when installed (it has no fp32/fp64 kernels), else sdpa."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r} is unknown; choose one of {BACKENDS}")
    half = str(precision).startswith(("bf16", "16"))
    if name == "auto":
        return "flash" if device.type == "cuda" and half and _flash_available() else "sdpa"
    if name == "flash" and device.type != "cuda":
        raise ValueError("model.attention=flash needs a CUDA device; use model.attention=sdpa (or auto) on CPU")
    return name


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    q_TND: torch.Tensor,
    k_TND: torch.Tensor,
    v_TND: torch.Tensor,
    meta: VarlenMeta,
    prefix_k_PHD: torch.Tensor | None = None,
    prefix_v_PHD: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Return the attention output ``o_TND`` [T, Hq, D] for a packed chunk (see module docstring)."""
    if meta.num_prefix_tokens and prefix_k_PHD is None:
        raise ValueError("meta has prefix lengths but no prefix keys/values were given")
    if backend == "flash":
        return _flash_varlen(q_TND, k_TND, v_TND, meta, prefix_k_PHD, prefix_v_PHD)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r} is not resolved; call resolve_backend first")
    scale = q_TND.shape[-1] ** -0.5
    outs = []
    p0 = 0
    for b, (lq, lp) in enumerate(zip(meta.seqlens_q, meta.prefix_lens)):
        s, e = meta.cu_seqlens_q_list[b], meta.cu_seqlens_q_list[b + 1]
        if lq == 0:
            continue
        pk = prefix_k_PHD[p0 : p0 + lp] if lp else None
        pv = prefix_v_PHD[p0 : p0 + lp] if lp else None
        p0 += lp
        outs.append(_segment_attention(q_TND[s:e], k_TND[s:e], v_TND[s:e], pk, pv, scale))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


# ---------------------------------------------------------------------------------------------
# sdpa reference: one segment, blocks merged by log-sum-exp, fused kernels forward and backward
# ---------------------------------------------------------------------------------------------


def _to_bhld(x_LHD: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, H, D] -> [1, H*groups, L, D]; kv head h serves query heads h*groups .. h*groups+groups-1."""
    x = x_LHD.transpose(0, 1).unsqueeze(0)
    # No copy otherwise: the fused CPU kernel reads strided q/k/v (last dim contiguous) directly, and a
    # layout copy of the prefix would be O(sequence) per layer.
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def _fold_q(x_1HLD: torch.Tensor, groups: int) -> torch.Tensor:
    """[1, Hq, L, ...] -> [1, Hkv, groups*L, ...]: the query heads sharing a kv head become one longer
    query sequence. Exact for the unmasked prefix block, and the prefix is never expanded to Hq heads."""
    return x_1HLD.reshape(1, x_1HLD.shape[1] // groups, groups * x_1HLD.shape[2], *x_1HLD.shape[3:])


def _unfold_q(x_1HLD: torch.Tensor, groups: int) -> torch.Tensor:
    return x_1HLD.reshape(1, x_1HLD.shape[1] * groups, x_1HLD.shape[2] // groups, *x_1HLD.shape[3:])


def _fold_groups(g_1HLD: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient w.r.t. expanded kv heads [1, Hq, L, D] -> [L, Hkv, D] (sum over each group)."""
    _, hq, L, D = g_1HLD.shape
    g = g_1HLD[0]
    if groups > 1:
        g = g.view(hq // groups, groups, L, D).sum(1)
    return g.transpose(0, 1)


# Off CPU without flash-attn, the math fallback below materialises one (chunk x block keys) score matrix
# per call: correct, but it does not keep the O(chunk) memory bound. On CUDA use model.attention=flash.
def _fused_fwd(q, k, v, causal: bool, scale: float):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return _blockwise_fwd_math(q, k, v, causal, scale)


def _fused_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale
        )
    return _blockwise_bwd_math(do, q, k, v, o, lse, causal, scale)


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    # Bottom-right aligned; only used by the non-CPU math fallback.
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _blockwise_fwd_math(q, k, v, causal, scale):
    s = _acc(q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).to(q.dtype)
    return p @ v, lse


def _blockwise_bwd_math(do, q, k, v, o, lse, causal, scale):
    s = _acc(q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.to(q.dtype).transpose(-1, -2) @ do
    dp = _acc(do @ v.transpose(-1, -2))
    delta = (_acc(do) * _acc(o)).sum(-1, keepdim=True)
    ds = (p * (dp - delta) * scale).to(q.dtype)
    return ds @ k, ds.transpose(-1, -2) @ q, dv


def merge_blocks(o1, lse1, o2, lse2):
    """Merge two attention blocks over disjoint keys: ``(o, lse)`` of softmax over their union.

    ``o_i`` [..., L, D], ``lse_i`` [..., L]. Weights ``w_i = exp(lse_i - lse)`` are written as
    ``sigmoid(lse_1 - lse_2)`` and ``sigmoid(lse_2 - lse_1)``: the same numbers without a separate
    ``exp`` (on CPU PyTorch's ``exp`` goes through MKL's vector math, whose rounding can differ from
    process to process; ``sigmoid`` uses PyTorch's own vectorised code). Merged in >= fp32, cast once.
    """
    acc = torch.promote_types(o1.dtype, torch.float32)
    d = (lse1 - lse2).to(acc)
    o = o1.to(acc) * torch.sigmoid(d)[..., None] + o2.to(acc) * torch.sigmoid(-d)[..., None]
    return o.to(o1.dtype), torch.logaddexp(lse1, lse2)


class _PrefixCausalAttention(torch.autograd.Function):
    """o = softmax([q·pk | causal q·k]) [pv | v] for one segment; saves only O(L + P) tensors."""

    @staticmethod
    def forward(ctx, q_LHD, k_LHD, v_LHD, pk_PHD, pv_PHD, scale):
        groups = q_LHD.shape[1] // k_LHD.shape[1]
        q = _to_bhld(q_LHD, 1)
        o, lse = _fused_fwd(q, _to_bhld(k_LHD, groups), _to_bhld(v_LHD, groups), True, scale)
        if pk_PHD is not None:
            op, lsep = _fused_fwd(_fold_q(q, groups), _to_bhld(pk_PHD, 1), _to_bhld(pv_PHD, 1), False, scale)
            op, lsep = _unfold_q(op, groups), _unfold_q(lsep, groups)
            o, lse = merge_blocks(o, lse, op, lsep)
        o = o.contiguous()
        ctx.scale, ctx.groups, ctx.has_prefix = scale, groups, pk_PHD is not None
        ctx.save_for_backward(q_LHD, k_LHD, v_LHD, pk_PHD, pv_PHD, o, lse)
        return o[0].transpose(0, 1)

    @staticmethod
    def backward(ctx, do_LHD):
        q_LHD, k_LHD, v_LHD, pk_PHD, pv_PHD, o, lse = ctx.saved_tensors
        g, scale = ctx.groups, ctx.scale
        q = _to_bhld(q_LHD, 1)
        do = _to_bhld(do_LHD, 1)
        # With the merged (o, lse), each block's fused backward yields exactly its share of the gradient.
        dq, dk, dv = _fused_bwd(do, q, _to_bhld(k_LHD, g), _to_bhld(v_LHD, g), o, lse, True, scale)
        dq_LHD = dq[0].transpose(0, 1)
        dpk = dpv = None
        if ctx.has_prefix:
            dq2, dpk, dpv = _fused_bwd(_fold_q(do, g), _fold_q(q, g), _to_bhld(pk_PHD, 1), _to_bhld(pv_PHD, 1),
                                       _fold_q(o, g), _fold_q(lse, g), False, scale)
            dq_LHD = dq_LHD + _unfold_q(dq2, g)[0].transpose(0, 1)
            dpk, dpv = _fold_groups(dpk, 1), _fold_groups(dpv, 1)
        return dq_LHD, _fold_groups(dk, g), _fold_groups(dv, g), dpk, dpv, None


def _segment_attention(q_LHD, k_LHD, v_LHD, pk_PHD, pv_PHD, scale):
    return _PrefixCausalAttention.apply(q_LHD, k_LHD, v_LHD, pk_PHD, pv_PHD, scale)


# ---------------------------------------------------------------------------------------------
# flash-attn (CUDA), imported lazily
# ---------------------------------------------------------------------------------------------


def _interleave_prefix(x_TND, prefix_PHD, meta: VarlenMeta) -> torch.Tensor:
    """Own keys [T, H, D] + prefixes [P, H, D] -> [T+P, H, D] laid out per segment as [prefix | own]."""
    if not meta.num_prefix_tokens:
        return x_TND
    parts, p0 = [], 0
    for b, (lq, lp) in enumerate(zip(meta.seqlens_q, meta.prefix_lens)):
        if lp:
            parts.append(prefix_PHD[p0 : p0 + lp])
            p0 += lp
        s = meta.cu_seqlens_q_list[b]
        parts.append(x_TND[s : s + lq])
    return torch.cat(parts, dim=0)


def _flash_varlen(q_TND, k_TND, v_TND, meta, prefix_k_PHD, prefix_v_PHD):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:  # pragma: no cover - GPU only
        raise ImportError(
            "model.attention=flash needs the flash-attn package: pip install -e '.[cuda]' "
            "(or use model.attention=sdpa)"
        ) from e
    dev = q_TND.device
    cu_q = torch.tensor(meta.cu_seqlens_q_list, dtype=torch.int32, device=dev)
    cu_k = torch.tensor(meta.cu_seqlens_k_list, dtype=torch.int32, device=dev)
    k_all = _interleave_prefix(k_TND, prefix_k_PHD, meta)
    v_all = _interleave_prefix(v_TND, prefix_v_PHD, meta)
    max_q = max(meta.seqlens_q)
    max_k = max(q + p for q, p in zip(meta.seqlens_q, meta.prefix_lens))
    # flash-attn >= 2.1 aligns the causal mask bottom-right when seqlen_k > seqlen_q: what we need.
    return flash_attn_varlen_func(q_TND, k_all, v_all, cu_q, cu_k, max_q, max_k, causal=True,
                                  softmax_scale=q_TND.shape[-1] ** -0.5)
