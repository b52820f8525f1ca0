"""Attention kernels behind one small interface: forward and backward of ONE block, with its log-sum-exp.

A *block* is a batch of segments, each a query range attending to a key range (``VarlenBlock``)::

    q_THD        [Tq, Hq, D]    queries of all segments, concatenated
    k_SHD, v_SHD [Tk, Hkv, D]   keys/values of all segments, concatenated (Hq = groups * Hkv)
    segment b    queries cu_q[b]:cu_q[b+1] attend to keys cu_k[b]:cu_k[b+1]
    causal       query i attends to keys 0..i (blocks are causal only when Lq_b == Lk_b per segment)

Every kernel has the same four methods (``BlockKernels``):

    forward(q, k, v, blk, causal, scale)                  -> o_THD [Tq, Hq, D], lse (native layout), aux
    backward(do, q, k, v, o, lse, aux, blk, causal, scale) -> dq, dk, dv      (dk/dv per kv head)
    lse_rows(lse, blk)                                     -> lse_HT [Hq, Tq] (>= fp32)
    lse_native(lse_HT, blk, spec)                          -> lse in the layout ``backward`` expects

``backward`` takes the output and LSE of the *whole* attention (all blocks merged), not the block's own:
then each block's backward yields exactly its share of the gradient (``attention.py``). ``aux`` is
whatever a kernel needs back (its RNG state tensors); ``spec`` = (shape, dtype) of the native LSE.

    kernels         device  dtypes                GQA              native LSE
    CpuFused        cpu     fp64 / fp32 / bf16    in the kernel    [Hq, Tq] (one fused call per segment)
    Math            any     any (fp64 reference)  k/v repeated     [Hq, Tq]  materialises scores: tests only
    TorchFlash      cuda    bf16 / fp16           in the kernel    [Hq, Tq]  (older torch: [B, Hq, max_q])
    TorchEfficient  cuda    fp32 / bf16 / fp16    k/v repeated     [B, Hq, ceil32(max_q)]
    FlashAttn       cuda    bf16 / fp16           in the kernel    [Hq, Tq]  (flash-attn >= 2.7)
    FlashAttn4      cuda    bf16 / fp16 (sm90+)   in the kernel    [Hq, Tq]  (flash-attn-4, flash_attn.cute)

The CUDA kernels take the whole block in one call (``cu_seqlens`` as int32 device tensors, built once
per block and cached on it) and read strided inputs whose last dimension is contiguous, so a prefix
view of the state store goes in without a copy. Only TorchEfficient's and Math's causal blocks
repeat k/v to the query heads (O(chunk)); the CPU fused kernel reads Hkv < Hq heads itself (no copy, and
no per-group sum in backward); ``attention.py`` folds the query heads of an unmasked
prefix block instead, so a prefix is never expanded.
"""

from __future__ import annotations

import functools

import torch

LseSpec = tuple[tuple[int, ...], torch.dtype]


class VarlenBlock:
    """Segment lengths of one block; device tensors (cu_seqlens, row indices) are built once and cached."""

    def __init__(self, seqlens_q, seqlens_k) -> None:
        self.seqlens_q = tuple(int(x) for x in seqlens_q)
        self.seqlens_k = tuple(int(x) for x in seqlens_k)
        if len(self.seqlens_q) != len(self.seqlens_k) or not self.seqlens_q:
            raise ValueError("a block needs one (query, key) length pair per segment, and at least one")
        if min(self.seqlens_q) <= 0 or min(self.seqlens_k) <= 0:
            raise ValueError(f"empty segments are not passed to kernels: q {self.seqlens_q}, k {self.seqlens_k}")
        self.cu_q_list = _cumsum(self.seqlens_q)
        self.cu_k_list = _cumsum(self.seqlens_k)
        self.max_q, self.max_k = max(self.seqlens_q), max(self.seqlens_k)
        self.num_q, self.num_k = self.cu_q_list[-1], self.cu_k_list[-1]
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.seqlens_q)

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def cu_q(self, device) -> torch.Tensor:
        return self._cached(("cu_q", str(device)), lambda: _int32(self.cu_q_list, device))

    def cu_k(self, device) -> torch.Tensor:
        return self._cached(("cu_k", str(device)), lambda: _int32(self.cu_k_list, device))

    def row_index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment, position in segment) of every query row: the gather index of padded [B, H, M] LSEs."""
        def make():
            seg = torch.repeat_interleave(torch.arange(len(self)), torch.tensor(self.seqlens_q))
            pos = torch.arange(self.num_q) - torch.tensor(self.cu_q_list[:-1])[seg]
            return seg.to(device), pos.to(device)
        return self._cached(("rows", str(device)), make)


def _cumsum(xs) -> list[int]:
    out = [0]
    for x in xs:
        out.append(out[-1] + x)
    return out


def _int32(xs, device) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int32, device=device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def repeat_kv(x_SHD: torch.Tensor, groups: int) -> torch.Tensor:
    """[S, Hkv, D] -> [S, Hkv*groups, D]: query head h reads kv head h // groups (GQA)."""
    return x_SHD.repeat_interleave(groups, dim=1) if groups > 1 else x_SHD


def sum_groups(g_SHD: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient w.r.t. repeated kv heads [S, Hq, D] -> [S, Hkv, D] (sum over each group)."""
    if groups == 1:
        return g_SHD
    S, H, D = g_SHD.shape
    return g_SHD.view(S, H // groups, groups, D).sum(2)


class BlockKernels:
    """Interface (see module docstring). Subclasses with an unpadded [Hq, Tq] LSE keep these defaults."""

    name = "abstract"

    def forward(self, q, k, v, blk: VarlenBlock, causal: bool, scale: float):
        raise NotImplementedError

    def backward(self, do, q, k, v, o, lse, aux, blk: VarlenBlock, causal: bool, scale: float):
        raise NotImplementedError

    def lse_rows(self, lse: torch.Tensor, blk: VarlenBlock) -> torch.Tensor:
        if lse.dim() == 2:  # [Hq, Tq]
            return lse
        if lse.dim() == 3 and lse.shape[0] == len(blk) and lse.shape[2] >= blk.max_q:  # [B, Hq, M >= max_q]
            if len(blk) == 1:
                return lse[0, :, : blk.num_q]
            seg, pos = blk.row_index(lse.device)
            return lse[seg, :, pos].transpose(0, 1)
        raise RuntimeError(f"{self.name}: unexpected LSE shape {tuple(lse.shape)} for a block of {len(blk)} "
                           f"segments, {blk.num_q} query rows, max length {blk.max_q}")

    def lse_native(self, lse_HT: torch.Tensor, blk: VarlenBlock, spec: LseSpec) -> torch.Tensor:
        shape, dtype = spec
        if len(shape) == 2:
            return lse_HT.to(dtype).contiguous()
        out = torch.zeros(shape, dtype=dtype, device=lse_HT.device)
        if len(blk) == 1:
            out[0, :, : blk.num_q] = lse_HT
        else:
            seg, pos = blk.row_index(lse_HT.device)
            out[seg, :, pos] = lse_HT.transpose(0, 1).to(dtype)
        return out


def lse_spec(lse: torch.Tensor) -> LseSpec:
    return tuple(lse.shape), lse.dtype


# ---------------------------------------------------------------------------------------------
# CPU: PyTorch's fused flash kernel, one call per segment, no explicit mask, GQA in the kernel
# ---------------------------------------------------------------------------------------------


def _cat_rows(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Per-segment results as one tensor (the one part itself when there is one: no copy)."""
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def _bhld(x_LHD: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> [1, H, L, D] as a strided view: the fused CPU kernel reads it without a copy."""
    return x_LHD.transpose(0, 1).unsqueeze(0)


class CpuFusedKernels(BlockKernels):
    name = "cpu-fused"

    def forward(self, q, k, v, blk, causal, scale):
        os, lses = [], []
        for b in range(len(blk)):
            qs, qe, ks, ke = blk.cu_q_list[b], blk.cu_q_list[b + 1], blk.cu_k_list[b], blk.cu_k_list[b + 1]
            ob, lb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _bhld(q[qs:qe]), _bhld(k[ks:ke]), _bhld(v[ks:ke]), 0.0, causal, scale=scale)
            os.append(ob[0].transpose(0, 1))
            lses.append(lb[0])
        # One cat per block, not one copy per segment (a packed chunk holds dozens of segments).
        return _cat_rows(os, 0), _cat_rows(lses, 1), None

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        dqs, dks, dvs = [], [], []
        for b in range(len(blk)):
            qs, qe, ks, ke = blk.cu_q_list[b], blk.cu_q_list[b + 1], blk.cu_k_list[b], blk.cu_k_list[b + 1]
            dqb, dkb, dvb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhld(do[qs:qe]), _bhld(q[qs:qe]), _bhld(k[ks:ke]), _bhld(v[ks:ke]),
                _bhld(o[qs:qe]), lse[:, qs:qe].unsqueeze(0), 0.0, causal, scale=scale)
            dqs.append(dqb[0].transpose(0, 1))
            dks.append(dkb[0].transpose(0, 1))
            dvs.append(dvb[0].transpose(0, 1))
        return _cat_rows(dqs, 0), _cat_rows(dks, 0), _cat_rows(dvs, 0)


# ---------------------------------------------------------------------------------------------
# Math reference: explicit scores and mask, per segment. Exact in float64 on any device; it keeps a
# (queries x keys) matrix per segment, so it is only the float64 reference off CPU, never a training path.
# ---------------------------------------------------------------------------------------------


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(diagonal=lk - lq)  # bottom-right


def _scores(q_LHD, k_SHD, causal, scale):
    s = torch.einsum("qhd,khd->hqk", q_LHD.to(_acc(q_LHD.dtype)), k_SHD.to(_acc(k_SHD.dtype))) * scale
    if causal:
        s = s.masked_fill(~_causal_mask(q_LHD.shape[0], k_SHD.shape[0], q_LHD.device), float("-inf"))
    return s


class MathKernels(BlockKernels):
    name = "math"

    def forward(self, q, k, v, blk, causal, scale):
        g = q.shape[1] // k.shape[1]
        o = q.new_empty(q.shape)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=_acc(q.dtype), device=q.device)
        for b in range(len(blk)):
            qs, qe, ks, ke = blk.cu_q_list[b], blk.cu_q_list[b + 1], blk.cu_k_list[b], blk.cu_k_list[b + 1]
            s = _scores(q[qs:qe], repeat_kv(k[ks:ke], g), causal, scale)
            lse[:, qs:qe] = torch.logsumexp(s, dim=-1)
            p = torch.exp(s - lse[:, qs:qe, None])
            o[qs:qe] = torch.einsum("hqk,khd->qhd", p, repeat_kv(v[ks:ke], g).to(p.dtype)).to(o.dtype)
        return o, lse, None

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        g = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b in range(len(blk)):
            qs, qe, ks, ke = blk.cu_q_list[b], blk.cu_q_list[b + 1], blk.cu_k_list[b], blk.cu_k_list[b + 1]
            kr, vr = repeat_kv(k[ks:ke], g), repeat_kv(v[ks:ke], g)
            acc = _acc(q.dtype)
            p = torch.exp(_scores(q[qs:qe], kr, causal, scale) - lse[:, qs:qe, None].to(acc))
            do_b = do[qs:qe].to(acc)
            dp = torch.einsum("qhd,khd->hqk", do_b, vr.to(acc))
            delta = (do_b * o[qs:qe].to(acc)).sum(-1).transpose(0, 1)  # [H, Lq]
            ds = p * (dp - delta[..., None]) * scale
            dq[qs:qe] = torch.einsum("hqk,khd->qhd", ds, kr.to(acc)).to(dq.dtype)
            dk[ks:ke] = sum_groups(torch.einsum("hqk,qhd->khd", ds, q[qs:qe].to(acc)), g).to(dk.dtype)
            dv[ks:ke] = sum_groups(torch.einsum("hqk,qhd->khd", p, do_b), g).to(dv.dtype)
        return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# CUDA: PyTorch's built-in kernels that return the LSE
# ---------------------------------------------------------------------------------------------


def _flash_max_q(blk: VarlenBlock) -> int:
    # FlashAttention-2 reorders grouped query heads into the query length when max_seqlen_q == 1 (a
    # decoding shortcut) and then lays the LSE out differently; max_seqlen_q is only an upper bound of
    # the segment lengths, so 2 keeps every call on the one layout this module reads.
    return max(blk.max_q, 2)


class TorchFlashKernels(BlockKernels):
    """``aten._flash_attention_forward/_backward`` (FlashAttention-2 inside PyTorch), varlen, bf16/fp16."""

    name = "torch-flash"

    def forward(self, q, k, v, blk, causal, scale):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, blk.cu_q(q.device), blk.cu_k(q.device), _flash_max_q(blk), blk.max_k, 0.0, causal, False,
            scale=scale)
        return out, lse, (rng_state, unused)

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        rng_state, unused = aux
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            do, q, k, v, o, lse, blk.cu_q(q.device), blk.cu_k(q.device), _flash_max_q(blk), blk.max_k, 0.0, causal,
            rng_state, unused, scale=scale)
        return dq, dk, dv


class TorchEfficientKernels(BlockKernels):
    """``aten._efficient_attention_forward/_backward`` (memory-efficient, cutlass), varlen via cu_seqlens,
    inputs as [1, T, H, D]; equal query and kv heads, so a causal block repeats k/v (O(chunk))."""

    name = "torch-efficient"
    NO_MASK, CAUSAL_TOP_LEFT = 0, 1  # sdp::CustomMaskType; causal blocks have Lq == Lk, so top-left is exact

    def forward(self, q, k, v, blk, causal, scale):
        g = q.shape[1] // k.shape[1]
        out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
            q.unsqueeze(0), repeat_kv(k, g).unsqueeze(0), repeat_kv(v, g).unsqueeze(0), None,
            blk.cu_q(q.device), blk.cu_k(q.device), blk.max_q, blk.max_k, 0.0,
            self.CAUSAL_TOP_LEFT if causal else self.NO_MASK, True, scale=scale)
        return out[0], lse, (seed, offset)

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        g = q.shape[1] // k.shape[1]
        seed, offset = aux
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            do.unsqueeze(0), q.unsqueeze(0), repeat_kv(k, g).unsqueeze(0), repeat_kv(v, g).unsqueeze(0), None,
            o.unsqueeze(0), blk.cu_q(q.device), blk.cu_k(q.device), blk.max_q, blk.max_k, lse, 0.0, seed, offset,
            self.CAUSAL_TOP_LEFT if causal else self.NO_MASK, False, scale=scale)
        return dq[0], sum_groups(dk[0], g), sum_groups(dv[0], g)


# ---------------------------------------------------------------------------------------------
# CUDA: the flash-attn package (optional), imported lazily
# ---------------------------------------------------------------------------------------------

FLASH_ATTN_MIN_VERSION = (2, 7)


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in str(text).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def import_flash_attn():
    """flash-attn's varlen forward/backward, or ImportError naming the fix."""
    try:
        import flash_attn
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward, _flash_attn_varlen_forward
    except ImportError as e:
        raise ImportError("model.attention=flash needs the flash-attn package (>= 2.7): pip install -e '.[cuda]' "
                          "(or use model.attention=sdpa)") from e
    version = getattr(flash_attn, "__version__", "0")
    if _version_tuple(version) < FLASH_ATTN_MIN_VERSION:
        raise ImportError(f"flash-attn {version} is too old: chunkflow_pl calls the varlen kernels of flash-attn "
                          ">= 2.7 (pip install -U flash-attn), or use model.attention=sdpa")
    return _flash_attn_varlen_forward, _flash_attn_varlen_backward


class FlashAttnKernels(BlockKernels):
    """``flash_attn.flash_attn_interface._flash_attn_varlen_forward/_backward`` (flash-attn >= 2.7)::

        fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size_left,
            window_size_right, softcap, alibi_slopes, return_softmax) -> (out, lse [Hq, Tq] fp32, S_dmask, rng)
        bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal,
            window_size_left, window_size_right, softcap, alibi_slopes, deterministic, rng_state)
            writes dq, dk, dv in place (GQA: dk/dv per kv head)
    """

    name = "flash-attn"

    def __init__(self) -> None:
        self._fwd, self._bwd = import_flash_attn()

    def forward(self, q, k, v, blk, causal, scale):
        out, lse, _, rng_state = self._fwd(
            q, k, v, blk.cu_q(q.device), blk.cu_k(q.device), _flash_max_q(blk), blk.max_k, 0.0, scale, causal,
            window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False)
        return out, lse, rng_state

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(do, q, k, v, o, lse, dq, dk, dv, blk.cu_q(q.device), blk.cu_k(q.device), _flash_max_q(blk),
                  blk.max_k, 0.0, scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                  alibi_slopes=None, deterministic=torch.are_deterministic_algorithms_enabled(), rng_state=aux)
        return dq, dk, dv


class FlashAttn4Kernels(BlockKernels):
    """flash-attn-4 (``flash_attn.cute.interface``: CuTe-DSL kernels, JIT-compiled at first call; Hopper
    forward and backward; ``pip install flash-attn-4==4.0.0b36``, a pre-release)::

        _flash_attn_fwd(q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=, max_seqlen_k=, softmax_scale=,
                        causal=, return_lse=True) -> (out, lse [Hq, Tq] fp32 natural log, None, None, None)
        _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=, causal=, cu_seqlens_q=, cu_seqlens_k=,
                        max_seqlen_q=, max_seqlen_k=, deterministic=) -> (dq, dk, dv)   (dk/dv per kv head)

    Unlike flash-attn 2 the backward takes ``out`` before ``dout`` and allocates dq/dk/dv itself, the LSE is
    returned only when asked for (``return_lse``: our custom backward needs it, even though nothing here
    requires grad), there is no RNG state, and every option is a keyword (a beta's private functions move:
    keywords fail loudly on a rename instead of shifting silently). Causal masks are bottom-right aligned
    as in flash-attn 2 (only Lq == Lk blocks are causal here, where top-left and bottom-right agree).
    """

    name = "flash-attn-4"

    def __init__(self) -> None:
        self._fwd, self._bwd = import_flash_attn_cute()

    def forward(self, q, k, v, blk, causal, scale):
        out, lse, *_ = self._fwd(q, k, v, cu_seqlens_q=blk.cu_q(q.device), cu_seqlens_k=blk.cu_k(q.device),
                                 max_seqlen_q=blk.max_q, max_seqlen_k=blk.max_k, softmax_scale=scale, causal=causal,
                                 return_lse=True)
        return out, lse, None

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        dq, dk, dv = self._bwd(q, k, v, o, do, lse, softmax_scale=scale, causal=causal,
                               cu_seqlens_q=blk.cu_q(q.device), cu_seqlens_k=blk.cu_k(q.device),
                               max_seqlen_q=blk.max_q, max_seqlen_k=blk.max_k,
                               deterministic=torch.are_deterministic_algorithms_enabled())[:3]
        return dq, dk, dv


FLASH_ATTN_4_PIN = "flash-attn-4==4.0.0b36"


def import_flash_attn_cute():
    """flash-attn-4's forward/backward, or ImportError naming the fix. Its import needs CUDA (the CUTLASS DSL
    loads the driver), so anything it raises counts as "not available here"."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 - ImportError, or the DSL failing to find a driver
        raise ImportError(f"flash-attn-4 is not importable here ({type(e).__name__}: {str(e)[:200]}): "
                          f"pip install '{FLASH_ATTN_4_PIN}' on a CUDA machine") from e
    return _flash_attn_fwd, _flash_attn_bwd


def _importable(importer) -> bool:
    try:
        importer()
    except ImportError:
        return False
    return True


def flash_kernel_name(device: torch.device) -> str:
    """The kernels ``model.attention=flash`` runs on ``device``, best first: flash-attn-4 (sm90+), flash-attn 2
    (>= 2.7), PyTorch's own flash kernel (sm80+). On CPU only a test stand-in of either package is found."""
    cuda = device.type == "cuda"
    if _importable(import_flash_attn_cute) and (not cuda or _capability(_index(device))[0] >= 9):
        return "flash-attn-4"
    if _importable(import_flash_attn):
        return "flash-attn"
    if torch_flash_usable(device):
        return "torch-flash"
    raise ImportError(f"model.attention=flash on {device.type} needs flash-attn-4 on sm90+ (pip install "
                      f"'{FLASH_ATTN_4_PIN}'), flash-attn >= 2.7 (pip install -e '.[cuda]') or PyTorch's flash "
                      f"kernel (sm80+); use model.attention=sdpa")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else -1


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index if index >= 0 else None)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------

_INSTANCES: dict[str, BlockKernels] = {}
KERNELS = {"cpu-fused": CpuFusedKernels, "math": MathKernels, "torch-flash": TorchFlashKernels,
           "torch-efficient": TorchEfficientKernels, "flash-attn": FlashAttnKernels,
           "flash-attn-4": FlashAttn4Kernels}


def get_kernels(name: str) -> BlockKernels:
    if name not in KERNELS:
        raise ValueError(f"attention kernels {name!r} unknown; choose one of {sorted(KERNELS)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = KERNELS[name]()
    return _INSTANCES[name]


def torch_flash_usable(device: torch.device) -> bool:
    return device.type == "cuda" and torch.backends.cuda.is_flash_attention_available() and \
        _capability(_index(device))[0] >= 8


def flash_kernels(device: torch.device) -> BlockKernels:
    """``model.attention=flash``'s kernels on ``device`` (``flash_kernel_name``), chosen once per device."""
    key = f"flash@{device}"
    if key not in _INSTANCES:  # the import probes are slow: one per device, not one per layer call
        _INSTANCES[key] = get_kernels(flash_kernel_name(device))
    return _INSTANCES[key]


def select_kernels(backend: str, device: torch.device, dtype: torch.dtype) -> BlockKernels:
    """``flash``: flash-attn-4, flash-attn 2 or PyTorch's flash (``flash_kernel_name``); ``sdpa``: PyTorch's own
    (CPU fused; CUDA flash for bf16/fp16, memory-efficient for fp32, the math reference for fp64, which CUDA
    kernels do not support)."""
    if backend == "flash":
        return flash_kernels(device)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r} is not resolved; call resolve_backend first")
    if device.type == "cpu":
        return get_kernels("cpu-fused")
    if device.type != "cuda" or dtype == torch.float64:
        return get_kernels("math")
    if dtype in (torch.bfloat16, torch.float16):
        if torch_flash_usable(device):
            return get_kernels("torch-flash")
        # Measured on an H100 (benchmarks/gpu_check.py): the memory-efficient kernel's half-precision backward
        # is wrong for one-token segments attending to a prefix (dq, dprefix off by 30-80%); fp32 is exact.
        raise ValueError(f"{dtype} attention on {device} needs PyTorch's flash kernel (sm80+) or flash-attn "
                         f"(pip install -e '.[cuda]', model.attention=flash); neither is available here: use "
                         f"trainer.precision=32-true")
    return get_kernels("torch-efficient")
