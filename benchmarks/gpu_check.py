"""One-command device check: attention kernels, memory vs sequence length, throughput/MFU, a train.py run.

    python benchmarks/gpu_check.py [--wheels DIR] [--sections env,a,b,c,d] [--budget-scale 1.0]
    python benchmarks/gpu_check.py --smoke          # CPU, tiny shapes: runs every non-CUDA line once

Sections (each with its own time budget, each in try/except: one failure never loses the others):

env  torch / CUDA / card, which attention kernels exist, the aten schemas the kernels call.
a    kernels: for every available CUDA kernel (torch flash, torch efficient in bf16 and fp32, flash-attn if
     installed, the float64 math reference): first the raw contract of ONE kernel call (LSE shape and
     layout, LSE and output vs float64, LSE round trip, backward given the true LSE), then the block
     attention (own block + prefix blocks merged by LSE, custom backward) vs a float64 reference on
     several prefix/segment layouts: forward and q/k/v/prefix-k/prefix-v gradients, relative errors.
b    memory: peak ``torch.cuda.max_memory_allocated`` of one training step (forward + backward through
     the real ChunkExecutor, k=1) of Qwen2.5-7B-shaped layers (2 layers, vocab 2048, bf16) vs sequence
     length, chunk 32K (and 8K if time allows), state offload off/on. Reports the K/V state bytes on
     the device and ``peak - base - device state``: the target is that this stays within 1.3x when the
     sequence grows 8x (32K -> 256K). With offload on, the step time relative to offload off (the copies
     run on side streams, one layer ahead: ``schedule/offload.py``).
c    throughput: tokens/s and model-FLOPs utilisation of Qwen2.5-7B-shaped layers (4 layers) at chunk
     32K, bf16, against the card's measured bf16 matmul peak (8192^3, median). FLOPs = matmuls + causal
     attention with the prefix counted; training = 3x forward (MFU); HFU also counts the first (kv-only)
     forwards of the recomputed chunks.
d    ``python train.py model=qwen0.5b chunk.size=32k data.max_len=128k trainer.precision=bf16-mixed
     trainer.max_steps=3 model.overrides.max_position_embeddings=128k logger=none`` in a subprocess (plus
     ``callbacks.checkpoint=null``: no 6 GB checkpoint write, and a temporary run dir), then, if the
     budget has room, the same with ``chunk.offload_state=true``. ``--wheels DIR``
     first pip-installs hydra-core, omegaconf, antlr4-python3-runtime and torchdata from DIR
     (``--no-index --no-deps``).

Output: progress lines while running, then a table (printed LAST, with the verdicts) and one
``RESULT {json}`` line; with ``$OUT`` set, the full results also go to ``$OUT/gpu_check.json`` (rewritten
after every section, so a killed run still leaves what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):  # the library, and gpu_long.py beside this file
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from chunkflow_pl.model.attention import VarlenMeta, block_attention, resolve_backend  # noqa: E402
from chunkflow_pl.model.attention_kernels import (  # noqa: E402
    KERNELS,
    VarlenBlock,
    get_kernels,
    lse_spec,
    select_kernels,
)
from chunkflow_pl.utils.sizes import parse_size  # noqa: E402

GiB = 2**30
BUDGETS = {"env": 15, "a": 45, "b": 125, "c": 55, "d": 150}  # seconds, scaled by --budget-scale
WHEELS = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "torchdata")
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4, torch.float64: 1e-10}
MEM_TARGET = 1.3


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def short_error(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# env
# ------------------------------------------------------------------------------------------------


def section_env(ctx, budget):
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(ctx.device)}
    try:
        import flash_attn

        out["flash_attn"] = getattr(flash_attn, "__version__", "?")
    except ImportError as e:
        out["flash_attn"] = f"not installed ({short_error(e)})"
    try:
        from importlib.metadata import version

        out["flash_attn_4"] = version("flash-attn-4")
        from chunkflow_pl.model.attention_kernels import import_flash_attn_cute

        import_flash_attn_cute()
    except Exception as e:  # noqa: BLE001 - report, do not fail
        out["flash_attn_4"] = f"{out.get('flash_attn_4', 'not installed')} ({short_error(e)})"
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        out.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / GiB, 1), cuda=torch.version.cuda,
                   torch_flash_available=bool(torch.backends.cuda.is_flash_attention_available()))
    schemas = {}
    for op in ("_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
               "_efficient_attention_backward", "_scaled_dot_product_flash_attention_for_cpu"):
        try:
            schemas[op] = str(getattr(torch.ops.aten, op).default._schema)
        except Exception as e:  # noqa: BLE001 - report, do not fail
            schemas[op] = f"missing: {short_error(e)}"
    out["schemas"] = schemas
    out["kernels"] = ctx.kernel_list()
    for k, v in out.items():
        if k != "schemas":
            log(f"env {k}: {v}")
    for v in schemas.values():
        log(f"schema {v}")
    return out


# ------------------------------------------------------------------------------------------------
# a: kernels
# ------------------------------------------------------------------------------------------------


def reference_attention(q, k, v, lens, pre, pk, pv):
    """Explicit-mask float64 reference. Segment b: queries see its whole prefix (segments with queries
    consume prefix rows in order) and own keys 0..i (bottom-right causal)."""
    outs, s, p0 = [], 0, 0
    g = q.shape[1] // k.shape[1]
    for lq, lp in zip(lens, pre):
        if lq == 0:
            continue
        kk = torch.cat([pk[p0:p0 + lp], k[s:s + lq]]).repeat_interleave(g, 1)
        vv = torch.cat([pv[p0:p0 + lp], v[s:s + lq]]).repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q[s:s + lq], kk) / q.shape[-1] ** 0.5
        mask = torch.ones(lq, lq + lp, dtype=torch.bool, device=q.device).tril(diagonal=lp)
        outs.append(torch.einsum("hqk,khd->qhd", sc.masked_fill(~mask, float("-inf")).softmax(-1), vv))
        s, p0 = s + lq, p0 + lp
    return torch.cat(outs)


def rel(a, b) -> float:
    a, b = a.double(), b.double().to(a.device)
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def raw_kernel_check(kern, dtype, device, heads, kv_heads, dim):
    """One kernel call on a varlen causal block [5, 130, 1] and an unmasked block: LSE layout and values,
    output, LSE round trip, and the backward given the float64 reference LSE."""
    res = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for causal, lq, lk in ((True, [5, 130, 1], [5, 130, 1]), (False, [37], [300])):
        blk = VarlenBlock(lq, lk)
        q64 = torch.randn(sum(lq), heads, dim, generator=g, dtype=torch.float64).to(device)
        k64 = torch.randn(sum(lk), kv_heads, dim, generator=g, dtype=torch.float64).to(device)
        v64 = torch.randn(sum(lk), kv_heads, dim, generator=g, dtype=torch.float64).to(device)
        q, k, v = (t.to(dtype) for t in (q64, k64, v64))
        scale = dim**-0.5
        o, lse, aux = kern.forward(q, k, v, blk, causal, scale)
        tag = "causal" if causal else "unmasked"
        native = tuple(lse.shape)
        layout = ("unpadded [Hq, Tq]" if lse.dim() == 2 and native == (heads, blk.num_q) else
                  f"padded [B={native[0]}, Hq, M={native[2]}]" if lse.dim() == 3 else f"UNEXPECTED {native}")
        rows = kern.lse_rows(lse, blk)
        # float64 reference on the same (rounded) inputs
        qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
        ref_rows, ref_o = [], []
        for b in range(len(blk)):
            qs, qe, ks, ke = blk.cu_q_list[b], blk.cu_q_list[b + 1], blk.cu_k_list[b], blk.cu_k_list[b + 1]
            grp = heads // kv_heads
            kk, vv = kr[ks:ke].repeat_interleave(grp, 1), vr[ks:ke].repeat_interleave(grp, 1)
            sc = torch.einsum("qhd,khd->hqk", qr[qs:qe], kk) * scale
            if causal:  # bottom-right aligned
                visible = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=device).tril(ke - ks - qe + qs)
                sc = sc.masked_fill(~visible, float("-inf"))
            ref_rows.append(torch.logsumexp(sc, -1))
            ref_o.append(torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv))
        ref_lse, ref_out = torch.cat(ref_rows, 1), torch.cat(ref_o)
        round_trip = kern.lse_rows(kern.lse_native(rows, blk, lse_spec(lse)), blk)
        do = torch.randn(ref_out.shape, generator=g, dtype=torch.float64).to(device)
        ref_grads = torch.autograd.grad(ref_out, (qr, kr, vr), do)
        # the kernel's backward with the reference LSE and output (what the merged backward feeds it)
        lse_in = kern.lse_native(ref_lse.detach().to(rows.dtype), blk, lse_spec(lse))
        dq, dk, dv = kern.backward(do.to(dtype), q, k, v, ref_out.detach().to(dtype), lse_in, aux, blk, causal, scale)
        res[tag] = {
            "lse_native_shape": list(native), "lse_layout": layout, "lse_dtype": str(lse.dtype).replace("torch.", ""),
            "lse_max_abs_err": (rows.double() - ref_lse.detach()).abs().max().item(),
            "o_rel_err": rel(o, ref_out.detach()),
            "lse_round_trip_exact": bool(torch.equal(round_trip.double(), rows.double())),
            "bwd_rel_err": {"dq": rel(dq, ref_grads[0]), "dk": rel(dk, ref_grads[1]), "dv": rel(dv, ref_grads[2])},
            "nan": bool(o.isnan().any() or rows.isnan().any() or dq.isnan().any()),
        }
    return res


def layouts(smoke: bool):
    if smoke:
        return {"no-prefix": ([9, 4, 1], [0, 0, 0]), "one-prefix": ([16], [40]),
                "two-tails": ([7, 5, 3], [23, 0, 50]), "one-token-tail": ([1, 6], [17, 0]),
                "all-ones": ([1, 1, 1], [0, 9, 0]), "zero-length": ([0, 5, 0, 4], [6, 11, 0, 0])}
    return {"no-prefix": ([300, 77, 1], [0, 0, 0]), "one-prefix": ([256], [1000]),
            "two-tails": ([130, 64, 5], [517, 0, 2048]), "one-token-tail": ([1, 100], [333, 0]),
            "all-ones": ([1, 1, 1], [0, 9, 0]), "zero-length": ([0, 50, 0, 20], [10, 70, 0, 0])}


def host_prefix_check(kern, dtype, device, lens, pre, heads, kv_heads, dim, seed=0):
    """chunk.offload_state: the prefix stays in (pinned) host memory and attention copies it per call.
    Same kernels and inputs as with a device prefix: the forward must be bit-identical, the gradients equal
    up to the kernels' own run-to-run noise, and the prefix gradient must come back on the host."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, P = sum(lens), sum(p for q, p in zip(lens, pre) if q)
    shapes = [(T, heads, dim), (T, kv_heads, dim), (T, kv_heads, dim), (P, kv_heads, dim), (P, kv_heads, dim)]
    dev = [torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in shapes]
    host = [t.detach().cpu() for t in dev[3:]]
    host = [(t.pin_memory() if device.type == "cuda" else t).requires_grad_() for t in host]
    meta = VarlenMeta.from_lengths(lens, pre)
    do = torch.randn(T, heads, dim, generator=g).to(device, dtype)
    o_dev = block_attention(*dev[:3], meta, dev[3], dev[4], kern)
    g_dev = torch.autograd.grad(o_dev, dev, do)
    o_host = block_attention(*dev[:3], meta, host[0], host[1], kern)
    g_host = torch.autograd.grad(o_host, [*dev[:3], *host], do)
    return {"forward_identical": bool(torch.equal(o_dev, o_host)),
            "grad_rel_diff": max(rel(a.to(device), b) for a, b in zip(g_host, g_dev)),
            "prefix_grad_on_host": all(t.device.type == "cpu" for t in g_host[3:])}


def block_check(kern, dtype, device, lens, pre, heads, kv_heads, dim, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, P = sum(lens), sum(p for q, p in zip(lens, pre) if q)
    shapes = [(T, heads, dim), (T, kv_heads, dim), (T, kv_heads, dim), (P, kv_heads, dim), (P, kv_heads, dim)]
    ref = [torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in shapes]
    ref = [t.to(dtype).double().requires_grad_() for t in ref]  # the reference sees the rounded inputs
    dev = [t.detach().to(dtype).requires_grad_() for t in ref]
    meta = VarlenMeta.from_lengths(lens, pre)
    out = block_attention(*dev[:3], meta, dev[3] if P else None, dev[4] if P else None, kern)
    exp = reference_attention(*ref[:3], lens, pre, ref[3], ref[4])
    do = torch.randn(exp.shape, generator=g, dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, dev, do.to(dtype), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(exp, ref, do, allow_unused=True, materialize_grads=True)
    errs = {"o": rel(out, exp)}
    for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv"), got, want):
        if b.numel():
            errs[name] = rel(a, b)
    nan = bool(out.isnan().any() or any(t.isnan().any() for t in got))
    return errs, nan


def section_a(ctx, budget):
    out = {"raw": {}, "block": {}, "verdict": {}}
    heads, kv_heads, dim = (4, 2, 16) if ctx.smoke else (28, 4, 128)  # Qwen2.5-7B: 28 query / 4 kv heads
    for name, dtype in ctx.kernel_list():
        key = f"{name}/{str(dtype).replace('torch.', '')}"
        if budget.left() < 2:
            out["verdict"][key] = "skipped (time)"
            continue
        try:
            kern = get_kernels(name)
        except Exception as e:  # noqa: BLE001
            out["verdict"][key] = f"unavailable: {short_error(e)}"
            log(f"a {key}: unavailable ({short_error(e)})")
            continue
        tol = TOL[dtype]
        ok = True
        try:
            r = raw_kernel_check(kern, dtype, ctx.device, heads, kv_heads, dim)
            out["raw"][key] = r
            for tag, x in r.items():
                good = (not x["nan"] and x["lse_round_trip_exact"] and "UNEXPECTED" not in x["lse_layout"]
                        and x["o_rel_err"] < tol and max(x["bwd_rel_err"].values()) < tol
                        and x["lse_max_abs_err"] < max(tol, 1e-3 if dtype != torch.float64 else 1e-10))
                ok &= good
                log(f"a raw {key} {tag}: lse {x['lse_layout']} {x['lse_dtype']} err {x['lse_max_abs_err']:.1e}, "
                    f"o {x['o_rel_err']:.1e}, bwd {max(x['bwd_rel_err'].values()):.1e}, "
                    f"round trip {x['lse_round_trip_exact']} -> {'ok' if good else 'FAIL'}")
        except Exception as e:  # noqa: BLE001
            ok = False
            out["raw"][key] = {"error": short_error(e), "trace": traceback.format_exc(limit=3)}
            log(f"a raw {key}: ERROR {short_error(e)}")
        for lname, (lens, pre) in layouts(ctx.smoke).items():
            for h, hk, d in ((heads, kv_heads, dim),) + (((14, 2, 64),) if lname == "two-tails" and not ctx.smoke
                                                        else ()):
                if budget.left() < 1:
                    break
                tag = f"{key} {lname} H{h}/{hk} D{d}"
                try:
                    errs, nan = block_check(kern, dtype, ctx.device, lens, pre, h, hk, d)
                    good = not nan and max(errs.values()) < tol
                    out["block"][tag] = {"rel_err": errs, "nan": nan, "ok": good}
                    log(f"a block {tag}: " + " ".join(f"{k} {v:.1e}" for k, v in errs.items())
                        + (" NaN" if nan else "") + f" -> {'ok' if good else 'FAIL'}")
                except Exception as e:  # noqa: BLE001
                    good = False
                    out["block"][tag] = {"error": short_error(e), "trace": traceback.format_exc(limit=3), "ok": False}
                    log(f"a block {tag}: ERROR {short_error(e)}")
                ok &= good
        if budget.left() > 1:
            try:
                lens, pre = layouts(ctx.smoke)["two-tails"]
                x = host_prefix_check(kern, dtype, ctx.device, lens, pre, heads, kv_heads, dim)
                good = x["forward_identical"] and x["prefix_grad_on_host"] and x["grad_rel_diff"] < tol / 10
                out["block"][f"{key} host-prefix (offload)"] = {**x, "ok": good}
                log(f"a offload {key}: host prefix vs device prefix: forward identical {x['forward_identical']}, "
                    f"grad diff {x['grad_rel_diff']:.1e}, prefix grad on host {x['prefix_grad_on_host']} "
                    f"-> {'ok' if good else 'FAIL'}")
            except Exception as e:  # noqa: BLE001
                good = False
                out["block"][f"{key} host-prefix (offload)"] = {"error": short_error(e), "ok": False,
                                                                "trace": traceback.format_exc(limit=3)}
                log(f"a offload {key}: ERROR {short_error(e)}")
            ok &= good
        out["verdict"][key] = f"ok (tol {tol:g})" if ok else f"FAIL (tol {tol:g})"
    return out


# ------------------------------------------------------------------------------------------------
# b / c: one training step of Qwen2.5-7B-shaped layers through the real executor
# ------------------------------------------------------------------------------------------------


def model_config(smoke: bool, layers: int):
    from chunkflow_pl.model.config import ModelConfig, get_preset

    if smoke:
        return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=layers, num_heads=4,
                           num_kv_heads=2, name="smoke")
    return get_preset("qwen7b", num_layers=layers, vocab_size=2048, tie_word_embeddings=False)


def build_model(ctx, cfg):
    from chunkflow_pl.model.decoder import Qwen2Decoder

    torch.manual_seed(0)
    with torch.device(ctx.device):  # built on the device, as Lightning's configure_model does (no slow CPU init)
        model = Qwen2Decoder(cfg, attention_backend=ctx.backend, loss_chunk=4096)
    model = model.to(ctx.dtype)
    torch.manual_seed(0)
    model.reset_parameters(0.02)
    return model.train()


def one_step(model, L: int, C: int, k: int, device, offload: bool, seed: int = 0):
    """Forward + backward of one L-token sequence in chunks of C (training's step path: a one-stage StepRunner)."""
    from chunkflow_pl.data.assemble import assemble_step
    from chunkflow_pl.data.labels import targets_from_labels
    from chunkflow_pl.data.packing import build_chunk_plan
    from chunkflow_pl.schedule.runner import StepRunner

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, model.cfg.vocab_size, (L,), generator=g)
    targets = targets_from_labels(seq)
    plan = build_chunk_plan([L], C)
    batch = assemble_step(plan.chunks, [seq], [targets], [L], [0], int((targets != -100).sum()), 0, len(plan.chunks))
    run = StepRunner(model.cfg, k, device, offload_state=offload).run(model, batch)
    return run.stats, [c.segments for c in batch.chunks], run.recomputed


def step_flops(cfg, chunks, recomputed) -> tuple[float, float]:
    """Model FLOPs (MFU) and hardware FLOPs (HFU: plus the recomputed chunks' first, kv-only forwards)."""
    from chunkflow_pl.model.flops import ModelFlops
    from chunkflow_pl.schedule.step_flops import step_flops as count

    fl = count(ModelFlops.from_config(cfg), chunks, recomputed)
    return fl.model, fl.hardware


def reset_peak(dev) -> int:
    """Free cached blocks and restart the peak counter: the bytes allocated now (0 off CUDA)."""
    gc.collect()
    if dev.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def measure_point(ctx, model, L, C, offload, k=1, repeats=1):
    dev = ctx.device
    model.zero_grad(set_to_none=True)
    base = reset_peak(dev)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync(dev)
        t0 = time.perf_counter()
        stats, chunks, recomputed = one_step(model, L, C, k, dev, offload)
        sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None  # before the norms below allocate
    # reserved also counts memory whose free waits for another stream (what the offload copies could leave)
    reserved = torch.cuda.max_memory_reserved() if dev.type == "cuda" else None
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    row = {"L": L, "C": C, "k": k, "offload": offload, "chunks": len(chunks), "recomputed": stats.recomputed_chunks,
           "step_s": statistics.median(times), "times": times, "loss": stats.loss_sum / max(stats.tokens, 1),
           "grad_norm": torch.linalg.vector_norm(torch.stack(grads)).item() if grads else None}
    model_flops, hw_flops = step_flops(model.cfg, chunks, recomputed)
    row.update(model_tflop=model_flops / 1e12, hw_tflop=hw_flops / 1e12, tokens_per_s=L / row["step_s"])
    if ctx.peak_tflops:
        row["mfu"] = model_flops / row["step_s"] / 1e12 / ctx.peak_tflops
        row["hfu"] = hw_flops / row["step_s"] / 1e12 / ctx.peak_tflops
    state = stats.peak_state_bytes
    row["state_gib"] = state / GiB
    row["device_state_gib"] = 0.0 if offload else state / GiB
    if peak is not None:
        row.update(base_gib=base / GiB, peak_gib=peak / GiB, step_gib=(peak - base) / GiB,
                   step_minus_state_gib=(peak - base) / GiB - row["device_state_gib"], reserved_gib=reserved / GiB)
    model.zero_grad(set_to_none=True)
    return row


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def section_b(ctx, budget):
    K = 1024
    cfg = model_config(ctx.smoke, layers=2)
    if ctx.smoke:
        series = {(64, False): [512, 4096], (64, True): [512, 4096]}
    else:
        series = {(32 * K, False): [32 * K, 64 * K, 256 * K], (32 * K, True): [32 * K, 64 * K, 256 * K],
                  (8 * K, False): [32 * K, 256 * K]}
    grid = [(L, C, off) for (C, off), Ls in series.items() for L in Ls]
    model = build_model(ctx, cfg)
    out = {"model": f"{cfg.name}-shaped, {cfg.num_layers} layers, vocab {cfg.vocab_size}, {ctx.dtype}",
           "backend": ctx.backend, "points": [], "verdict": {}}
    log(f"b model {out['model']} ({cfg.num_params() / 1e9:.2f} B params), attention {ctx.backend}")
    measure_point(ctx, model, min(grid)[0] // 4 if not ctx.smoke else 128, 64 if ctx.smoke else 2 * K, False)  # warm
    last = {}
    for L, C, off in grid:
        key = (C, off)
        if key in last:  # predict from the previous point of the series (attention grows ~L^2)
            Lp, tp = last[key]
            need = tp * (L / Lp) ** 2 * 1.2 + 3
        else:
            need = 5
        if budget.left() < need:
            out["points"].append({"L": L, "C": C, "offload": off, "skipped": f"time (needs ~{need:.0f}s, "
                                                                              f"{budget.left():.0f}s left)"})
            log(f"b L={fmt_len(L)} C={fmt_len(C)} offload={off}: skipped (time)")
            continue
        try:
            row = measure_point(ctx, model, L, C, off)
            last[key] = (L, row["step_s"])
            out["points"].append(row)
            mem = (f"peak {row['peak_gib']:.2f} GiB, step {row['step_gib']:.2f}, device state "
                   f"{row['device_state_gib']:.2f}, step-state {row['step_minus_state_gib']:.2f}" if "peak_gib" in row
                   else "memory n/a on cpu")
            log(f"b L={fmt_len(L)} C={fmt_len(C)} offload={off}: {row['step_s']:.2f}s, {mem}, "
                f"state {row['state_gib']:.2f} GiB, {row['tokens_per_s']:.0f} tok/s")
        except Exception as e:  # noqa: BLE001
            out["points"].append({"L": L, "C": C, "offload": off, "error": short_error(e),
                                  "trace": traceback.format_exc(limit=4)})
            log(f"b L={fmt_len(L)} C={fmt_len(C)} offload={off}: ERROR {short_error(e)}")
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    for (C, off), _ in series.items():
        pts = [p for p in out["points"] if p.get("C") == C and p.get("offload") == off and "step_minus_state_gib" in p]
        if len(pts) >= 2:
            lo, hi = min(pts, key=lambda p: p["L"]), max(pts, key=lambda p: p["L"])
            ratio = hi["step_minus_state_gib"] / lo["step_minus_state_gib"]
            out["verdict"][f"C={fmt_len(C)} offload={off}"] = {
                "L": f"{fmt_len(lo['L'])}->{fmt_len(hi['L'])}", "growth": hi["L"] / lo["L"],
                "step_minus_state_ratio": ratio, "ok": ratio <= MEM_TARGET,
                "peak_ratio": hi["peak_gib"] / lo["peak_gib"]}
    for p_on in out["points"]:  # offload changes where the state lives, not the numbers
        p_off = next((p for p in out["points"] if p.get("L") == p_on.get("L") and p.get("C") == p_on.get("C")
                      and p.get("offload") is False and "grad_norm" in p), None)
        if p_on.get("offload") is True and "grad_norm" in p_on and p_off is not None:
            out["verdict"][f"offload parity L={fmt_len(p_on['L'])} C={fmt_len(p_on['C'])}"] = {
                "loss_equal": p_on["loss"] == p_off["loss"],
                "grad_norm_rel_diff": abs(p_on["grad_norm"] - p_off["grad_norm"]) / max(p_off["grad_norm"], 1e-30),
                # the price of offload: prefixes prefetched / gradients returned on side streams (offload.py)
                "step_time_ratio": p_on["step_s"] / p_off["step_s"]}
    del model
    return out


def measure_matmul_peak(device, smoke: bool) -> dict:
    n = 512 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(5 if smoke else 20):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype), "median_s": med, "tflops": 2 * n**3 / med / 1e12,
            "max_tflops": 2 * n**3 / min(times) / 1e12}


def section_c(ctx, budget):
    K = 1024
    peak = measure_matmul_peak(ctx.device, ctx.smoke)
    ctx.peak_tflops = peak["tflops"]
    log(f"c matmul peak {peak['tflops']:.1f} TFLOP/s ({peak['n']}^3 {peak['dtype']}, median)")
    cfg = model_config(ctx.smoke, layers=2 if ctx.smoke else 4)
    model = build_model(ctx, cfg)
    out = {"matmul_peak": peak, "model": f"{cfg.name}-shaped, {cfg.num_layers} layers, {ctx.dtype}", "points": []}
    lengths = ctx.c_lengths or ([256, 1024] if ctx.smoke else [32 * K, 128 * K])
    C = 64 if ctx.smoke else 32 * K
    for backend in ctx.c_backends or [ctx.backend]:
        model.attention_backend = backend
        kern = select_kernels(backend, ctx.device, ctx.dtype).name
        measure_point(ctx, model, C // 4, C // 4, False)  # warm-up (flash-attn-4: JIT compile)
        for L in lengths:
            done = [p for p in out["points"] if "step_s" in p and p["kernel"] == kern]
            repeats = 2 if L <= 128 * K else 1
            need = done[-1]["step_s"] * repeats * 1.1 * (L / done[-1]["L"]) ** 2 + 3 if done else 5
            if budget.left() < need:
                out["points"].append({"L": L, "C": C, "kernel": kern,
                                      "skipped": f"time (needs ~{need:.0f}s, {budget.left():.0f}s left)"})
                log(f"c {kern} L={fmt_len(L)}: skipped (time: needs ~{need:.0f}s, {budget.left():.0f}s left)")
                continue
            try:
                row = measure_point(ctx, model, L, C, False, repeats=repeats)
                row["kernel"] = kern
                out["points"].append(row)
                log(f"c {kern} L={fmt_len(L)} C={fmt_len(C)} k=1: {row['step_s']:.2f}s, {row['tokens_per_s']:.0f} "
                    f"tok/s, MFU {row['mfu']:.1%}, HFU {row['hfu']:.1%} ({row['model_tflop']:.0f} model TFLOP)"
                    + (f", peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else ""))
            except Exception as e:  # noqa: BLE001
                out["points"].append({"L": L, "C": C, "kernel": kern, "error": short_error(e),
                                      "trace": traceback.format_exc(limit=4)})
                log(f"c {kern} L={fmt_len(L)}: ERROR {short_error(e)}")
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
    del model
    return out


# ------------------------------------------------------------------------------------------------
# d: a whole train.py run
# ------------------------------------------------------------------------------------------------


def install_wheels(wheels: str) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", wheels, *WHEELS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}


def train_overrides(smoke: bool) -> list[str]:
    """The run section d trains (the suite composes the GPU one with ``dry_run=true``: train.py's start-up
    checks, e.g. records longer than the model's positions, fail on CPU, not on a lent device)."""
    if smoke:
        return ["model=tiny", "chunk.size=256", "data.max_len=2k", "data.num_sequences=64",
                "trainer.precision=32-true", "trainer.max_steps=2", "trainer.accelerator=cpu"]
    # Qwen2.5-0.5B's own config says 32K positions; train.py refuses longer records unless raised
    return ["model=qwen0.5b", "chunk.size=32k", "data.max_len=128k", "trainer.precision=bf16-mixed",
            "trainer.max_steps=3", "model.overrides.max_position_embeddings=128k"]


def section_d(ctx, budget):
    out = {}
    if ctx.wheels:
        out["pip"] = install_wheels(ctx.wheels)
        log(f"d pip install from {ctx.wheels}: rc {out['pip']['rc']}")
    missing = []
    for mod in ("hydra", "omegaconf", "torchdata"):
        p = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        if p.returncode:
            missing.append(mod)
    if missing:
        out["skipped"] = f"missing {missing}: rerun with --wheels DIR (hydra-core, omegaconf, antlr4, torchdata wheels)"
        log(f"d skipped: {out['skipped']}")
        return out
    out.update(run_train(train_overrides(ctx.smoke), budget))
    # the same run with the K/V state in host memory (the copy engine), if the budget has room for it
    if out["rc"] == 0 and budget.left() > out["wall_s"] + 5:
        out["offload"] = run_train(train_overrides(ctx.smoke) + ["chunk.offload_state=true"], budget)
    return out


def run_train(overrides: list[str], budget) -> dict:
    """One ``train.py`` subprocess (no logger, no checkpoint, a temporary run dir) within ``budget``."""
    run_dir = tempfile.mkdtemp(prefix="gpu_check_train_")
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=none", "callbacks.checkpoint=null",
           f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    timeout = max(10.0, budget.left() - 3)
    log(f"d running (timeout {timeout:.0f}s): {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = f"timeout>{timeout:.0f}s"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
               ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    wall = time.perf_counter() - t0
    losses = re.findall(r"train/loss[=:]\s*([0-9.]+(?:e[-+]?\d+)?)", text)
    rates = re.findall(r"train/tokens_per_s[=:]\s*([0-9.]+(?:e[-+]?\d+)?)", text)
    steps = re.findall(r"max_steps=(\d+)` reached", text)
    out = dict(cmd=" ".join(cmd[1:]), rc=rc, wall_s=wall, last_loss=float(losses[-1]) if losses else None,
               last_tokens_per_s=float(rates[-1]) if rates else None, max_steps_reached=bool(steps),
               tail=text[-3000:], run_dir=run_dir)
    log(f"d rc={rc} in {wall:.0f}s, last loss {out['last_loss']}, last step {out['last_tokens_per_s']} tok/s, "
        f"max_steps reached: {bool(steps)}")
    if rc != 0:
        log("d output tail:\n" + text[-2500:])
    return out


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


class Ctx:
    def __init__(self, args) -> None:
        self.smoke = args.smoke
        self.wheels = args.wheels
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.dtype = torch.float32 if args.smoke else torch.bfloat16
        self.backend = resolve_backend(args.backend, self.device, "32-true" if args.smoke else "bf16-true")
        self.peak_tflops = None
        self.a_kernels = set(args.a_kernels.split(",")) if args.a_kernels else None
        self.c_backends = [b.strip() for b in args.c_backends.split(",") if b.strip()] if args.c_backends else None
        self.c_lengths = [parse_size(x) for x in args.c_lengths.split(",")] if args.c_lengths else None

    def kernel_list(self):
        if self.smoke:
            return [("cpu-fused", torch.float64), ("cpu-fused", torch.float32), ("math", torch.float64)]
        kl = [("torch-flash", torch.bfloat16), ("torch-efficient", torch.bfloat16), ("torch-efficient", torch.float32),
              ("math", torch.float64)]
        from chunkflow_pl.model.attention_kernels import import_flash_attn, import_flash_attn_cute

        for name, importer in (("flash-attn", import_flash_attn), ("flash-attn-4", import_flash_attn_cute)):
            try:
                importer()
                kl.insert(0, (name, torch.bfloat16))
            except ImportError:
                pass
        return [(n, d) for n, d in kl if n in KERNELS and (self.a_kernels is None or n in self.a_kernels)]


def table(results) -> list[str]:
    env = results.get("env") if isinstance(results.get("env"), dict) else {}
    where = f"  ({env.get('card', env.get('device', '?'))}, torch {torch.__version__})"
    lines = ["", "=" * 100, "gpu_check summary" + where, "=" * 100]
    for sec, title in (("env", "env"), ("a", "a: kernels vs float64"), ("b", "b: memory of one step (k=1)"),
                       ("c", "c: throughput"), ("d", "d: train.py")):
        r = results.get(sec)
        if r is None:
            continue
        lines.append(f"-- {title}")
        if isinstance(r, dict) and "error" in r:
            lines.append(f"   ERROR {r['error']}")
            continue
        if sec == "env":
            lines.append(f"   flash-attn: {r.get('flash_attn')}, torch flash available: "
                         f"{r.get('torch_flash_available')}, capability {r.get('capability')}")
        elif sec == "a":
            for key, x in r["raw"].items():
                for tag, y in x.items() if "error" not in x else [("call", x)]:
                    if "error" in y:
                        lines.append(f"   raw   {key:<24} {tag:<9} ERROR {y['error']}")
                    else:
                        lines.append(f"   raw   {key:<24} {tag:<9} lse {y['lse_layout']:<26} err "
                                     f"{y['lse_max_abs_err']:.1e} o {y['o_rel_err']:.1e} bwd "
                                     f"{max(y['bwd_rel_err'].values()):.1e}")
            worst = {}
            for tag, y in r["block"].items():
                kkey = tag.split()[0]
                if "error" in y:
                    lines.append(f"   block {tag}: ERROR {y['error']}")
                elif "rel_err" in y:
                    e = max(y["rel_err"].values())
                    if kkey not in worst or e > worst[kkey][0]:
                        worst[kkey] = (e, tag.split(" ", 1)[1])
                else:
                    lines.append(f"   offl. {kkey:<24} host prefix: forward identical {y['forward_identical']}, "
                                 f"grad diff {y['grad_rel_diff']:.1e}, prefix grad on host "
                                 f"{y['prefix_grad_on_host']}")
            for key, verdict in r["verdict"].items():
                w = worst.get(key)
                lines.append(f"   block {key:<24} {verdict}" + (f" worst {w[0]:.1e} ({w[1]})" if w else ""))
        elif sec in ("b", "c"):
            lines.append(f"   {r.get('model')}" + (f", matmul peak {r['matmul_peak']['tflops']:.0f} TFLOP/s"
                                                   if "matmul_peak" in r else ""))
            lines.append("   L      C      off   s      tok/s     MFU    HFU    peak   step   dev.state  step-state")
            for p in r["points"]:
                if "skipped" in p or "error" in p:
                    lines.append(f"   {fmt_len(p['L']):<6} {fmt_len(p['C']):<6} {str(p.get('offload', '')):<5} "
                                 f"{p.get('skipped') or 'ERROR ' + p['error']}")
                    continue
                g = lambda k, f="{:.2f}", p=p: f.format(p[k]) if k in p else "-"  # noqa: E731
                kern = f"{p['kernel']:<13}" if "kernel" in p else ""
                lines.append(f"   {fmt_len(p['L']):<6} {fmt_len(p['C']):<6} {str(p['offload']):<5} {kern}"
                             f"{p['step_s']:<6.2f} {p['tokens_per_s']:<9.0f} {g('mfu', '{:.1%}'):<6} "
                             f"{g('hfu', '{:.1%}'):<6} {g('peak_gib'):<6} {g('step_gib'):<6} "
                             f"{p['device_state_gib']:<10.2f} {g('step_minus_state_gib')}")
            for key, v in r.get("verdict", {}).items():
                if "step_minus_state_ratio" in v:
                    lines.append(f"   target {key}: L {v['L']} ({v['growth']:.0f}x): (step - device state) grew "
                                 f"{v['step_minus_state_ratio']:.2f}x (target <= {MEM_TARGET}) -> "
                                 f"{'ok' if v['ok'] else 'FAIL'}; peak grew {v['peak_ratio']:.2f}x")
                else:
                    lines.append(f"   {key}: loss equal {v['loss_equal']}, grad norm differs by "
                                 f"{v['grad_norm_rel_diff']:.1e}, step time on/off {v['step_time_ratio']:.2f}x")
        elif sec == "d":
            if "skipped" in r:
                lines.append(f"   skipped: {r['skipped']}")
            else:
                for name, x in (("", r), ("chunk.offload_state=true: ", r.get("offload"))):
                    if x is not None:
                        lines.append(f"   {name}rc {x['rc']} in {x['wall_s']:.0f}s, last loss {x['last_loss']}, "
                                     f"last step {x['last_tokens_per_s']} tok/s, max_steps reached "
                                     f"{x['max_steps_reached']}")
    return lines


def summary(results) -> dict:
    env = results.get("env") if isinstance(results.get("env"), dict) else {}
    s = {"card": env.get("card", env.get("device")), "torch": torch.__version__}
    a = results.get("a")
    if isinstance(a, dict) and "verdict" in a:
        s["kernels"] = a["verdict"]
        s["lse_layouts"] = {k: {t: y.get("lse_layout") for t, y in x.items() if isinstance(y, dict)}
                            for k, x in a["raw"].items() if "error" not in x}
    b = results.get("b")
    if isinstance(b, dict) and "verdict" in b:
        mem = {k: v for k, v in b["verdict"].items() if "step_minus_state_ratio" in v}
        s["memory"] = {k: round(v["step_minus_state_ratio"], 3) for k, v in mem.items()}
        s["memory_ok"] = all(v["ok"] for v in mem.values()) if mem else None
        s["offload_parity"] = {k: v for k, v in b["verdict"].items() if k.startswith("offload")}
        s["memory_points"] = [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()
                               if k in ("L", "C", "offload", "step_s", "peak_gib", "reserved_gib",
                                        "step_minus_state_gib", "device_state_gib", "error", "skipped")}
                              for p in b["points"]]
    c = results.get("c")
    if isinstance(c, dict) and "points" in c:
        s["matmul_peak_tflops"] = round(c["matmul_peak"]["tflops"], 1)
        s["throughput"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()
                            if k in ("L", "C", "kernel", "tokens_per_s", "mfu", "hfu", "step_s", "peak_gib", "error",
                                     "skipped")}
                           for p in c["points"]]
    d = results.get("d")
    if isinstance(d, dict):
        keys = ("rc", "wall_s", "last_loss", "last_tokens_per_s", "max_steps_reached", "skipped")
        s["train"] = {k: d.get(k) for k in keys if k in d}
        if "offload" in d:
            s["train"]["offload"] = {k: d["offload"].get(k) for k in keys if k in d["offload"]}
    s["errors"] = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    return s


def save(results, out_dir) -> None:
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sections", default="env,a,b,c,d", help="comma list of env,a,b,c,d,g,l,p,t,m (gpu_long.py)")
    ap.add_argument("--wheels", default=None, help="pip-install hydra-core/omegaconf/antlr4/torchdata from DIR first")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (checks the script, not the GPU)")
    ap.add_argument("--backend", default="auto", help="model.attention for sections b/c (auto|sdpa|flash)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    ap.add_argument("--budgets", default="", help="per-section seconds, e.g. c=200,m=330 (before --budget-scale)")
    ap.add_argument("--a-kernels", default=None, help="section a: only these kernels (e.g. flash-attn-4,math)")
    ap.add_argument("--c-backends", default=None, help="section c: model.attention values side by side (sdpa,flash)")
    ap.add_argument("--c-lengths", default=None, help="section c: sequence lengths (default 32k,128k)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: no section starts after this; each "
                    "section's budget is cut to what is left")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke to exercise the script on CPU)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out_dir = os.environ.get("OUT")
    results: dict = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    ctx = Ctx(args)
    import gpu_long  # its sections import this module's helpers: imported here, not at the top

    funcs = {"env": section_env, "a": section_a, "b": section_b, "c": section_c, "d": section_d, **gpu_long.SECTIONS}
    budgets = {**BUDGETS, **gpu_long.BUDGETS}
    for item in filter(None, args.budgets.split(",")):
        sec, sec_s = item.split("=")
        budgets[sec.strip()] = float(sec_s)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if "b" in sections and "c" in sections:  # c measures the matmul peak that b's MFU column uses
        sections = [s for s in sections if s != "c"]
        sections.insert(sections.index("b"), "c")
    for sec in sections:
        seconds = budgets[sec] * args.budget_scale * (3 if args.smoke and sec == "d" else 1)
        if args.deadline is not None:
            left = args.deadline - (time.perf_counter() - t_start)
            if left < 5:
                results[sec] = {"skipped": f"deadline ({args.deadline:.0f}s) reached"}
                log(f"section {sec}: skipped (deadline)")
                continue
            seconds = min(seconds, left)
        budget = Budget(seconds)
        log(f"section {sec} (budget {budget.seconds:.0f}s)")
        try:
            results[sec] = funcs[sec](ctx, budget)
        except Exception as e:  # noqa: BLE001
            results[sec] = {"error": short_error(e), "trace": traceback.format_exc(limit=6)}
            log(f"section {sec} ERROR {short_error(e)}\n{results[sec]['trace']}")
        results[sec + "_s"] = round(budget.seconds - budget.left(), 1)
        if ctx.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        save(results, out_dir)
    results["total_s"] = round(time.perf_counter() - t_start, 1)
    save(results, out_dir)
    print("\n".join(table(results) + gpu_long.table_lines(results)))
    print(f"total {results['total_s']:.0f}s" + (f"; full results in {out_dir}/gpu_check.json" if out_dir else ""))
    short = summary(results)
    short.update({sec: results[sec] for sec in gpu_long.SECTIONS if sec in results})
    print("RESULT " + json.dumps(short, default=str, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
