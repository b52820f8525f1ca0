"""Varlen causal attention with an optional per-segment prefix state: one block design on every device.

A chunk is a flat token batch (THD: ``T`` tokens, ``H`` heads, ``D`` head dim) of ``B`` segments.
Segment ``b`` has ``Lq_b`` new tokens and attends to ``P_b`` prefix keys/values (earlier tokens of the
same sequence, from the state store) followed by its own keys, causally, bottom-right aligned::

    segment b keys:   [ prefix P_b | own Lq_b ]
    query i sees:     all P_b prefix keys + own keys 0..i        (flash-attn ``causal=True`` semantics)

    q_TND            [T, Hq, D]      all segments' queries, concatenated
    k_TND, v_TND     [T, Hkv, D]     own keys/values (after RoPE)
    prefix_k         [P, Hkv, D]     prefixes of the segments with P_b > 0 and Lq_b > 0, concatenated in
                                     segment order; or a tuple with one [P_b, Hkv, D] tensor per such segment
                                     (views of the state store: never concatenated, never copied per layer)

The attention of a chunk is computed as two blocks and merged by log-sum-exp (as ring attention does)::

    own block     all segments in ONE kernel call, causal, keys = own keys          -> o_own, lse_own
    prefix block  per prefixed segment: its queries against its prefix, unmasked     -> o_pre, lse_pre
    merge         rows of prefixed segments only:  o = w_own o_own + w_pre o_pre,  lse = logaddexp(...)

A custom backward calls each block's backward kernel with the *merged* output and LSE, which yields
exactly that block's share of dq and its dk/dv: autograd saves only q, k, v, the prefix views (none
with a prefix mover, below), o and lse, O(chunk) besides the state. No (chunk x prefix) score matrix
and no copy of the prefix exists.
Segments without a prefix never reach the prefix block, so no kernel sees an empty key range (flash
kernels write lse = +inf there). The prefix block folds the query heads that share a kv head into its
query length (``[L, Hkv*g, D] -> [g*L, Hkv, D]``): exact because it is unmasked, and the prefix is
never expanded to the query heads (a GQA backward would otherwise allocate prefix x Hq gradients).

A prefix may live on another device than the queries (host memory with ``chunk.offload_state``):
each call copies it to the compute device and drops the copy, forward and backward, and its gradient
goes back to where the prefix lives. Autograd therefore keeps the host views only; device memory holds
one layer's prefix, transiently, whatever the sequence length. In training the executor puts a
``PrefixMover`` on the chunk's meta (``schedule/offload.py``): it serves these copies from a side
stream one layer ahead and takes the prefix gradients back to the host off the compute stream (the
prefix then enters without ``requires_grad``; its gradient goes to the mover, not through autograd).

Kernels (``attention_kernels.py``): ``sdpa`` = PyTorch's own (CPU fused, CUDA flash / memory-efficient,
float64 math reference off CPU), ``flash`` = flash-attn-4 (``flash_attn.cute``, sm90+), else flash-attn 2, else
PyTorch's flash kernel. Cu_seqlens are built once per chunk
(``VarlenMeta.plan`` is cached on the meta the executor builds per chunk) and reused by every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from chunkflow_pl.model.attention_kernels import (
    BlockKernels,
    VarlenBlock,
    flash_kernel_name,
    lse_spec,
    select_kernels,
)

BACKENDS = ("auto", "sdpa", "flash")
HALF_PRECISIONS = ("bf16", "16")


@dataclass(frozen=True)
class PrefixedSegment:
    """Query rows ``[start, end)`` of the chunk that attend to a ``prefix_len``-token prefix; ``block``: the
    folded prefix block (``groups * (end - start)`` queries, ``prefix_len`` keys)."""

    start: int
    end: int
    prefix_len: int
    block: VarlenBlock


@dataclass(frozen=True)
class BlockPlan:
    own: VarlenBlock | None  # None for an empty chunk
    prefixed: tuple[PrefixedSegment, ...]


@dataclass(frozen=True)
class VarlenMeta:
    """Segment metadata of one chunk. Python lists avoid device syncs; device tensors live in the plan."""

    seqlens_q: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    # Serves host-resident prefixes to every layer of this chunk (offloaded state on CUDA); None: the
    # prefixes given to attention are used as they are.
    prefix_mover: object | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.seqlens_q) != len(self.prefix_lens):
            raise ValueError("seqlens_q and prefix_lens must have one entry per segment")

    @classmethod
    def from_lengths(cls, seqlens_q, prefix_lens=None, prefix_mover=None) -> VarlenMeta:
        seqlens_q = tuple(int(x) for x in seqlens_q)
        prefix = tuple(int(x) for x in prefix_lens) if prefix_lens is not None else (0,) * len(seqlens_q)
        return cls(seqlens_q, prefix, prefix_mover)

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens_q)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens actually attended to (segments with queries)."""
        return sum(p for q, p in zip(self.seqlens_q, self.prefix_lens) if q)

    @cached_property
    def cu_seqlens_q_list(self) -> list[int]:
        out = [0]
        for n in self.seqlens_q:
            out.append(out[-1] + n)
        return out

    @cached_property
    def _plans(self) -> dict[int, BlockPlan]:
        return {}

    def plan(self, groups: int) -> BlockPlan:
        """Blocks of this chunk for ``groups`` query heads per kv head; built once, shared by all layers."""
        if groups not in self._plans:
            own_lens = [n for n in self.seqlens_q if n]
            own = VarlenBlock(own_lens, own_lens) if own_lens else None
            prefixed = tuple(
                PrefixedSegment(self.cu_seqlens_q_list[b], self.cu_seqlens_q_list[b + 1], p,
                                VarlenBlock([groups * q], [p]))
                for b, (q, p) in enumerate(zip(self.seqlens_q, self.prefix_lens)) if q and p)
            self._plans[groups] = BlockPlan(own, prefixed)
        return self._plans[groups]


def resolve_backend(name: str, device: torch.device, precision: str = "32-true") -> str:
    """``auto``: a flash-attn package (flash-attn-4 on sm90+, else flash-attn 2) on CUDA in half precision when
    installed (they have no fp32/fp64 kernels), else sdpa (whose half-precision CUDA kernel is PyTorch's flash).

    ``flash`` is checked here, before anything is built: it needs CUDA, a half precision and a flash kernel
    (``attention_kernels.flash_kernel_name``: flash-attn-4, flash-attn 2, or PyTorch's own, in that order).
    """
    if name not in BACKENDS:
        raise ValueError(f"model.attention={name!r} is unknown; choose one of {BACKENDS}")
    half = str(precision).startswith(HALF_PRECISIONS)
    if name == "auto":
        return "flash" if device.type == "cuda" and half and _flash_package(device) else "sdpa"
    if name == "flash":
        problems = []
        if device.type != "cuda":
            problems.append(f"a CUDA device (this run uses {device.type})")
        if not half:
            problems.append(f"trainer.precision=bf16-mixed or bf16-true (flash kernels have none for "
                            f"trainer.precision={precision})")
        if problems:
            raise ValueError("model.attention=flash needs " + " and ".join(problems)
                             + "; use model.attention=sdpa (or auto)")
        try:
            flash_kernel_name(device)
        except ImportError as e:
            raise ValueError(str(e)) from e
    return name


def _flash_package(device: torch.device) -> bool:
    """A flash-attn package (not PyTorch's bundled kernel) serves ``flash`` on this device."""
    try:
        return flash_kernel_name(device) in ("flash-attn-4", "flash-attn")
    except ImportError:
        return False


def attention(
    q_TND: torch.Tensor,
    k_TND: torch.Tensor,
    v_TND: torch.Tensor,
    meta: VarlenMeta,
    prefix_k: torch.Tensor | Sequence[torch.Tensor] | None = None,
    prefix_v: torch.Tensor | Sequence[torch.Tensor] | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Return the attention output ``o_TND`` [T, Hq, D] for a packed chunk (see module docstring)."""
    return block_attention(q_TND, k_TND, v_TND, meta, prefix_k, prefix_v,
                           select_kernels(backend, q_TND.device, q_TND.dtype), mover=meta.prefix_mover)


def block_attention(q_TND, k_TND, v_TND, meta: VarlenMeta, prefix_k, prefix_v, kernels: BlockKernels,
                    mover=None):
    """``attention`` with explicit kernels (benchmarks and tests pick them; training goes through ``attention``)."""
    T, Hq, D = q_TND.shape
    if T != meta.num_tokens:
        raise ValueError(f"q has {T} tokens but meta describes {meta.num_tokens}")
    groups = Hq // k_TND.shape[1]
    plan = meta.plan(groups)
    pks, pvs = _split_prefix(prefix_k, plan, "prefix_k"), _split_prefix(prefix_v, plan, "prefix_v")
    if plan.own is None:
        return q_TND.new_empty(q_TND.shape)
    if not pks:
        mover = None
    return _BlockAttention.apply(q_TND, k_TND, v_TND, plan, kernels, D**-0.5, mover, len(pks), *pks, *pvs)


def _split_prefix(prefix, plan: BlockPlan, name: str) -> tuple[torch.Tensor, ...]:
    """One tensor per prefixed segment: views of a concatenation, or the tensors given."""
    lens = [s.prefix_len for s in plan.prefixed]
    if not lens:
        if prefix is not None and (prefix.shape[0] if isinstance(prefix, torch.Tensor) else len(prefix)):
            raise ValueError(f"{name} given but no segment has both queries and a prefix")
        return ()
    if prefix is None:
        raise ValueError(f"meta has prefix lengths {lens} but no {name} was given")
    if isinstance(prefix, torch.Tensor):
        if prefix.shape[0] != sum(lens):
            raise ValueError(f"{name} has {prefix.shape[0]} rows, the prefixed segments need {sum(lens)} ({lens})")
        out, p0 = [], 0
        for n in lens:
            out.append(prefix[p0 : p0 + n])
            p0 += n
        return tuple(out)
    prefix = tuple(prefix)
    if [p.shape[0] for p in prefix] != lens:
        raise ValueError(f"{name} lengths {[p.shape[0] for p in prefix]} != prefix lengths {lens}")
    return prefix


# ---------------------------------------------------------------------------------------------
# the block design: helpers, merge, autograd function
# ---------------------------------------------------------------------------------------------


def fold_heads(x_LHD: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, Hkv*g, D] -> [g*L, Hkv, D]: query head hk*g+j at position i becomes row j*L+i of kv head hk."""
    if groups == 1:
        return x_LHD
    L, H, D = x_LHD.shape
    return x_LHD.reshape(L, H // groups, groups, D).permute(2, 0, 1, 3).reshape(groups * L, H // groups, D)


def unfold_heads(x_GHD: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x_GHD
    GL, Hkv, D = x_GHD.shape
    return x_GHD.reshape(groups, GL // groups, Hkv, D).permute(1, 2, 0, 3).reshape(GL // groups, Hkv * groups, D)


def fold_lse(lse_HL: torch.Tensor, groups: int) -> torch.Tensor:
    """[Hkv*g, L] -> [Hkv, g*L], matching ``fold_heads``."""
    H, L = lse_HL.shape
    return lse_HL.reshape(H // groups, groups * L)


def unfold_lse(lse_HG: torch.Tensor, groups: int) -> torch.Tensor:
    H, GL = lse_HG.shape
    return lse_HG.reshape(H * groups, GL // groups)


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
    return o.to(o1.dtype), torch.logaddexp(lse1.to(acc), lse2.to(acc))


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device, non_blocking=True)


def _on_device(prefix: tuple[torch.Tensor, ...], device: torch.device, mover, layer: int | None, backward: bool):
    """The prefix on the compute device: the mover's copy of ``layer`` (copied ahead on a side stream), or
    the given views, copied here if they live elsewhere."""
    if mover is not None:
        return mover.fetch(layer, backward)
    return tuple(_to(p, device) for p in prefix)


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, kernels: BlockKernels, scale: float, mover, n: int, *prefix):
        g, dev = q.shape[1] // k.shape[1], q.device
        o, lse_n, aux = kernels.forward(q, k, v, plan.own, True, scale)
        layer = mover.layer_of(prefix) if mover is not None else None
        on_dev = _on_device(prefix, dev, mover, layer, backward=False)  # after the own block, which needs none
        pks, pvs = on_dev[:n], on_dev[n:]
        specs, auxes = [lse_spec(lse_n)], [aux]
        lse = kernels.lse_rows(lse_n, plan.own)
        if n:
            lse = lse.to(torch.promote_types(lse.dtype, torch.float32), copy=True)  # merged rows are written in
        for seg, pk, pv in zip(plan.prefixed, pks, pvs):
            s, e = seg.start, seg.end
            op, lp_n, aux = kernels.forward(fold_heads(q[s:e], g), pk, pv, seg.block, False, scale)
            specs.append(lse_spec(lp_n))
            auxes.append(aux)
            om, lm = merge_blocks(o[s:e].transpose(0, 1), lse[:, s:e],
                                  unfold_heads(op, g).transpose(0, 1), unfold_lse(kernels.lse_rows(lp_n, seg.block), g))
            o[s:e] = om.transpose(0, 1)
            lse[:, s:e] = lm
        # the given prefix views (host ones when offloaded); with a mover none: it holds them, by layer
        ctx.save_for_backward(q, k, v, o, lse, *(prefix if mover is None else ()))
        ctx.plan, ctx.kernels, ctx.scale, ctx.n, ctx.specs, ctx.auxes = plan, kernels, scale, n, specs, auxes
        ctx.mover, ctx.layer = mover, layer
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *prefix = ctx.saved_tensors
        prefix = tuple(prefix)
        plan, kern, scale, n, mover = ctx.plan, ctx.kernels, ctx.scale, ctx.n, ctx.mover
        g, dev = q.shape[1] // k.shape[1], q.device
        do = do.contiguous()
        dq, dk, dv = kern.backward(do, q, k, v, o, kern.lse_native(lse, plan.own, ctx.specs[0]), ctx.auxes[0],
                                   plan.own, True, scale)
        on_dev = _on_device(prefix, dev, mover, ctx.layer, backward=True)
        pks, pvs = on_dev[:n], on_dev[n:]
        dpks, dpvs = [], []
        for i, (seg, pk, pv) in enumerate(zip(plan.prefixed, pks, pvs)):
            s, e = seg.start, seg.end
            lse_f = kern.lse_native(fold_lse(lse[:, s:e], g), seg.block, ctx.specs[i + 1])
            dqp, dpk, dpv = kern.backward(fold_heads(do[s:e], g), fold_heads(q[s:e], g), pk, pv,
                                          fold_heads(o[s:e], g), lse_f, ctx.auxes[i + 1], seg.block, False, scale)
            acc = torch.promote_types(dq.dtype, torch.float32)  # sum the two blocks' shares before rounding
            dq[s:e] = (dq[s:e].to(acc) + unfold_heads(dqp, g).to(acc)).to(dq.dtype)
            dpks.append(dpk)
            dpvs.append(dpv)
        if mover is not None:  # the mover takes them to the store off the compute stream
            mover.send_grads(ctx.layer, (*dpks, *dpvs))
            return (dq, dk, dv, None, None, None, None, None, *(None,) * (2 * n))
        # To where each prefix lives. Blocking: a non_blocking device->host copy returns before the data
        # lands, and the host-side accumulation that follows would read it too early.
        back = [d if d.device == p.device else d.to(p.device) for d, p in zip((*dpks, *dpvs), prefix)]
        return (dq, dk, dv, None, None, None, None, None, *back)

