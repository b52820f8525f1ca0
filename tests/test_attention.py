"""Attention backends: bottom-right causal semantics with a prefix, and the O(chunk) memory bound."""

from __future__ import annotations

import pytest
import torch

from chunkflow_pl.model.attention import VarlenMeta, attention, resolve_backend


def naive(q, k, v, lens, pre, pk, pv):
    """Explicit-mask reference: query i of a segment sees the whole prefix and own keys 0..i."""
    outs, s, p0 = [], 0, 0
    g = q.shape[1] // k.shape[1]
    for lq, lp in zip(lens, pre):
        kk = torch.cat([pk[p0:p0 + lp], k[s:s + lq]]).repeat_interleave(g, 1)
        vv = torch.cat([pv[p0:p0 + lp], v[s:s + lq]]).repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q[s:s + lq], kk) / q.shape[-1] ** 0.5
        mask = torch.ones(lq, lq + lp, dtype=torch.bool).tril(diagonal=lp)  # bottom-right aligned
        outs.append(torch.einsum("hqk,khd->qhd", sc.masked_fill(~mask, float("-inf")).softmax(-1), vv))
        s, p0 = s + lq, p0 + lp
    return torch.cat(outs)


@pytest.mark.parametrize("lens,pre", [([5, 3, 7], [4, 0, 6]), ([1], [9]), ([8], [0]), ([2, 2], [0, 1])])
def test_sdpa_matches_bottom_right_causal_reference(lens, pre):
    torch.manual_seed(0)
    T, P = sum(lens), sum(pre)
    q = torch.randn(T, 4, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(T, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(max(P, 1), 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    meta = VarlenMeta.from_lengths(lens, pre)
    out = attention(q, k, v, meta, pk[:P], pv[:P])
    ref = naive(q, k, v, lens, pre, pk[:P], pv[:P])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, k, v, pk, pv], g, allow_unused=True),
                    torch.autograd.grad(ref, [q, k, v, pk, pv], g, allow_unused=True)):
        # an input that reaches no output may come back as None on one side and zeros on the other
        a = torch.zeros_like(b if b is not None else a) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_bottom_right_alignment_is_not_top_left():
    """The first query of a segment with a prefix sees every prefix key (top-left would see one)."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(2, 1, 4, dtype=torch.float64)
    pk, pv = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    out = attention(q, k, v, VarlenMeta.from_lengths([2], [3]), pk, pv)
    w = torch.softmax(torch.cat([pk, k[:1]])[:, 0] @ q[0, 0] / 2.0, 0)
    torch.testing.assert_close(out[0, 0], w @ torch.cat([pv, v[:1]])[:, 0])


def saved_bytes(prefix_len: int, lq: int = 256) -> int:
    q = torch.randn(lq, 4, 16, requires_grad=True)
    k, v = torch.randn(lq, 2, 16, requires_grad=True), torch.randn(lq, 2, 16, requires_grad=True)
    pk, pv = torch.randn(prefix_len, 2, 16, requires_grad=True), torch.randn(prefix_len, 2, 16, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attention(q, k, v, VarlenMeta.from_lengths([lq], [prefix_len]), pk, pv)
    return sum(seen.values())


def test_saved_tensors_grow_only_by_the_prefix_itself():
    """1K vs 16K prefix: saved bytes differ exactly by the extra prefix keys/values (no chunk x prefix)."""
    small, large = saved_bytes(1024), saved_bytes(16384)
    prefix_kv_bytes = lambda n: 2 * n * 2 * 16 * 4  # noqa: E731  k and v, [n, Hkv=2, D=16] fp32
    assert large - small == prefix_kv_bytes(16384) - prefix_kv_bytes(1024)
    # and the chunk-sized part is O(chunk): far below one 256 x 16K score matrix per head (64 MiB)
    assert small - prefix_kv_bytes(1024) < 256 * 4 * 16 * 4 * 8


def test_backend_resolution_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("flash", torch.device("cpu"), "bf16-mixed")
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("xformers", torch.device("cpu"))


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_flash_in_full_precision_fails_naming_the_precision(precision):
    """flash-attn has no fp32/fp64 kernels: say so (and the fix) before anything is built."""
    with pytest.raises(ValueError, match=f"trainer.precision={precision}.*model.attention=sdpa"):
        resolve_backend("flash", torch.device("cuda"), precision)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_math_reference_equals_fused_cpu_kernel_in_float64(causal, kv_heads):
    """The math kernels (the float64 reference off CPU) compute the fused CPU kernels' forward and backward."""
    from chunkflow_pl.model.attention_kernels import CpuFusedKernels, MathKernels, VarlenBlock

    torch.manual_seed(0)
    q = torch.randn(12, 2, 8, dtype=torch.float64)
    k, v = torch.randn(12, kv_heads, 8, dtype=torch.float64), torch.randn(12, kv_heads, 8, dtype=torch.float64)
    blk = VarlenBlock([3, 9], [3, 9])
    o, lse, _ = CpuFusedKernels().forward(q, k, v, blk, causal, 0.3)
    o2, lse2, _ = MathKernels().forward(q, k, v, blk, causal, 0.3)
    torch.testing.assert_close(o2, o, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(lse2, lse, rtol=1e-13, atol=1e-13)
    do = torch.randn_like(o)
    ref = CpuFusedKernels().backward(do, q, k, v, o, lse, None, blk, causal, 0.3)
    for a, b in zip(MathKernels().backward(do, q, k, v, o, lse, None, blk, causal, 0.3), ref):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_auto_picks_sdpa_for_full_precision_and_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), "bf16-mixed") == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), "32-true") == "sdpa"  # flash-attn has no fp32 kernel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels,dtype", [("torch-flash", torch.bfloat16), ("torch-efficient", torch.bfloat16),
                                           ("torch-efficient", torch.float32), ("flash-attn", torch.bfloat16),
                                           ("flash-attn-4", torch.bfloat16)])
def test_cuda_kernels_match_the_float64_reference(kernels, dtype):
    """Every CUDA kernel through the block attention: forward and all gradients vs float64 on CPU."""
    from chunkflow_pl.model.attention import block_attention
    from chunkflow_pl.model.attention_kernels import get_kernels

    if kernels == "flash-attn":
        pytest.importorskip("flash_attn.flash_attn_interface")
    if kernels == "flash-attn-4":
        pytest.importorskip("flash_attn.cute.interface")
    kern = get_kernels(kernels)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    layouts = [([64, 33], [100, 0]), ([5, 130, 1], [0, 77, 300]), ([1], [1000])]
    if kernels == "torch-efficient" and dtype == torch.bfloat16:
        # its half-precision backward is wrong in some layouts of one-token segments attending to a prefix
        # (H100: NaN dq for the last layout here, which the other two pass; gpu_check's one-token-tail and
        # all-ones layouts 30-85% off): select_kernels never picks it for half precision (next test)
        layouts = layouts[:2]
    for lens, pre in layouts:
        torch.manual_seed(0)
        T, P = sum(lens), sum(pre)
        ref = [torch.randn(n, h, 64, dtype=torch.float64, requires_grad=True)
               for n, h in ((T, 8), (T, 2), (T, 2), (P, 2), (P, 2))]
        dev = [t.detach().to("cuda", dtype).requires_grad_() for t in ref]
        out = block_attention(*dev[:3], VarlenMeta.from_lengths(lens, pre), dev[3], dev[4], kern)
        exp = naive(*ref[:3], lens, pre, ref[3], ref[4])
        g = torch.randn_like(exp)
        got_grads = torch.autograd.grad(out, dev, g.to("cuda", dtype))
        exp_grads = torch.autograd.grad(exp, ref, g)
        for name, a, b in zip(["o", "dq", "dk", "dv", "dpk", "dpv"], [out, *got_grads], [exp, *exp_grads]):
            err = (a.double().cpu() - b).norm() / b.norm()
            assert err < tol, f"{kernels} {dtype} {lens}/{pre} {name}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision_never_selects_the_memory_efficient_kernel():
    from chunkflow_pl.model.attention_kernels import select_kernels, torch_flash_usable

    cuda = torch.device("cuda")
    assert select_kernels("sdpa", cuda, torch.float32).name == "torch-efficient"
    for dtype in (torch.bfloat16, torch.float16):
        if torch_flash_usable(cuda):
            assert select_kernels("sdpa", cuda, dtype).name == "torch-flash"
        else:
            with pytest.raises(ValueError, match="needs PyTorch's flash kernel"):
                select_kernels("sdpa", cuda, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefix_in_pinned_host_memory_equals_device_prefix():
    """chunk.offload_state: a host prefix is copied per call; same numbers, its gradient lands on the host."""
    from chunkflow_pl.model.attention import block_attention
    from chunkflow_pl.model.attention_kernels import get_kernels

    torch.manual_seed(0)
    lens, pre = [64, 33], [100, 0]
    dev = [torch.randn(n, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for n, h in ((97, 8), (97, 2), (97, 2), (100, 2), (100, 2))]
    host = [t.detach().cpu().pin_memory().requires_grad_() for t in dev[3:]]
    meta, kern = VarlenMeta.from_lengths(lens, pre), get_kernels("torch-flash")
    do = torch.randn(97, 8, 64, device="cuda", dtype=torch.bfloat16)
    a = block_attention(*dev[:3], meta, dev[3], dev[4], kern)
    b = block_attention(*dev[:3], meta, host[0], host[1], kern)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a, dev[3:], do)
    gb = torch.autograd.grad(b, host, do)
    assert all(g.device.type == "cpu" for g in gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y.cuda(), x, rtol=1e-2, atol=1e-2)
