"""gpu_check's long-context sections (imported by ``gpu_check.py``; each takes ``(ctx, budget)``, returns a dict).

g  whole-step gradients: one chunked training step (chains, prefixes, a one-token tail, k=1) of a 2-layer
   Qwen2.5-7B-shaped model in bf16 through each half-precision kernel (torch flash, flash-attn-4 when
   installed) against the same step in float64 through the math kernel: relative L2 error of the loss and
   of every parameter's gradient (the worst one reported).
l  layer checkpointing (``chunk.layer_checkpoint``): one step of 4 Qwen2.5-7B-shaped layers at chunk 32K,
   bf16, with it off and on: peak device memory and step time at 32K and 128K tokens.
p  a GPU peer: transformers ``Qwen2ForCausalLM`` (sdpa, gradient checkpointing on, one sequence per
   micro-batch) and chunkflow (chunk 32K, k=1) on the same long-tail batch (one 128K sequence and 31 short
   ones) with the same bf16 weights: tokens/s of forward + backward (no optimizer) and peak device memory.
   If transformers runs out of memory, the longest sequence is halved until it fits (and said so).
t  where the time goes at 128K (4 layers, chunk 32K, k=1, the flash kernel): a ``torch.profiler`` trace of one
   step, CUDA kernel time by category (matmul, attention, elementwise, copies, loss, other), and the
   attention split into own/prefix blocks and their LSE merge (CUDA events around each kernel call).
m  a 1M-token pipeline stage: 4 Qwen2.5-7B layers with the embedding and the head (both: a superset of any
   pp=7 stage), full vocabulary, ``max_position_embeddings`` 1M, chunk 32K, k=1, state offload on: one
   step at 128K, then at 1,048,576 tokens if the budget fits it; tokens/s, MFU/HFU, device peak and its
   ratio to 128K's, and where the K/V state lived (host, pinned).

``--smoke`` runs each with tiny shapes on CPU (the suite does), so the GPU run does not spend its minutes on
a broken import.
"""

from __future__ import annotations

import time
import traceback

import torch
from gpu_check import (
    GiB,
    build_model,
    fmt_len,
    log,
    measure_point,
    model_config,
    rel,
    reset_peak,
    short_error,
    sync,
)

K = 1024


def _kernel_name(model, ctx) -> str:
    from chunkflow_pl.model.attention_kernels import select_kernels

    return select_kernels(model.attention_backend, ctx.device, ctx.dtype).name


def _half_backends(ctx) -> list[str]:
    """sdpa (PyTorch's flash on CUDA) and flash when a flash-attn package serves it (else it is the same)."""
    if ctx.smoke:
        return ["sdpa"]
    from chunkflow_pl.model.attention_kernels import flash_kernel_name

    try:
        return ["sdpa", "flash"] if flash_kernel_name(ctx.device) != "torch-flash" else ["sdpa"]
    except ImportError:
        return ["sdpa"]


def _batch(lengths, vocab, chunk, seed=0):
    """A StepBatch of ``lengths`` (random tokens, every next token supervised) in chunks of ``chunk``."""
    from chunkflow_pl.data.assemble import assemble_step
    from chunkflow_pl.data.labels import targets_from_labels
    from chunkflow_pl.data.packing import build_chunk_plan

    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(list(lengths), chunk)
    batch = assemble_step(plan.chunks, seqs, targets, list(lengths), list(range(len(lengths))), n_label, 0,
                          len(plan.chunks))
    return batch, seqs, targets, n_label


def _run(model, batch, k, device, offload=False):
    from chunkflow_pl.schedule.runner import StepRunner

    return StepRunner(model.cfg, k, device, offload_state=offload).run(model, batch)


# ------------------------------------------------------------------------------------------------
# g: whole-step gradients, bf16 kernels vs the float64 math kernel
# ------------------------------------------------------------------------------------------------


def section_g(ctx, budget):
    cfg = model_config(ctx.smoke, layers=2)
    lengths, chunk = ([300, 70, 1, 45], 64) if ctx.smoke else ([3000, 700, 1, 129, 2049], 1024)
    model = build_model(ctx, cfg)
    batch, *_ = _batch(lengths, cfg.vocab_size, chunk)
    ref = build_model(ctx, cfg).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ref.attention_backend = "sdpa"  # float64: the math kernel on CUDA (the fused kernel on CPU)
    st_ref = _run(ref, batch, 1, ctx.device).stats
    want = {n: p.grad for n, p in ref.named_parameters()}
    out = {"model": f"{cfg.name}-shaped, {cfg.num_layers} layers", "lengths": lengths, "chunk": chunk,
           "reference": _kernel_name(ref, ctx) + "/float64", "kernels": {}}
    for backend in _half_backends(ctx):
        if budget.left() < 3:
            break
        model.attention_backend = backend
        model.zero_grad(set_to_none=True)
        st = _run(model, batch, 1, ctx.device).stats
        errs = {n: rel(p.grad, want[n]) for n, p in model.named_parameters()}
        worst = max(errs, key=errs.get)
        name = _kernel_name(model, ctx)
        out["kernels"][name] = {"loss_rel_err": abs(st.loss_sum - st_ref.loss_sum) / abs(st_ref.loss_sum),
                                "worst_grad_rel_err": errs[worst], "worst_param": worst,
                                "median_grad_rel_err": sorted(errs.values())[len(errs) // 2]}
        log(f"g {name}: loss rel err {out['kernels'][name]['loss_rel_err']:.1e}, worst grad {errs[worst]:.1e} "
            f"({worst}), median {out['kernels'][name]['median_grad_rel_err']:.1e}")
    del model, ref
    return out


# ------------------------------------------------------------------------------------------------
# l: layer checkpointing on / off
# ------------------------------------------------------------------------------------------------


def section_l(ctx, budget):
    from chunkflow_pl.strategy.layer_checkpoint import apply_layer_checkpoint

    cfg = model_config(ctx.smoke, layers=2 if ctx.smoke else 4)
    C = 64 if ctx.smoke else 32 * K
    lengths = [64, 256] if ctx.smoke else [32 * K, 128 * K]
    model = build_model(ctx, cfg)
    out = {"model": f"{cfg.name}-shaped, {cfg.num_layers} layers, {ctx.dtype}", "chunk": C,
           "kernel": _kernel_name(model, ctx), "points": []}
    measure_point(ctx, model, C // 4, C // 4, False)  # warm-up
    for policy in ("none", "full"):
        apply_layer_checkpoint(model, policy)  # in place; "full" after all "none" points
        for L in lengths:
            if budget.left() < (3 if L == lengths[0] else 20):
                out["points"].append({"L": L, "policy": policy, "skipped": "time"})
                continue
            row = measure_point(ctx, model, L, C, False)
            row["policy"] = policy
            out["points"].append(row)
            log(f"l layer_checkpoint={policy} L={fmt_len(L)}: {row['step_s']:.2f}s, "
                + (f"peak {row['peak_gib']:.2f} GiB, step {row['step_gib']:.2f} GiB" if "peak_gib" in row else "")
                + f", grad norm {row['grad_norm']:.6e}")
    for L in lengths:
        a = next((p for p in out["points"] if p["L"] == L and p["policy"] == "none" and "step_s" in p), None)
        b = next((p for p in out["points"] if p["L"] == L and p["policy"] == "full" and "step_s" in p), None)
        if a and b:
            v = {"time_full_over_none": b["step_s"] / a["step_s"], "loss_equal": a["loss"] == b["loss"],
                 "grad_norm_rel_diff": abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"]}
            if "step_gib" in a:
                v.update(step_gib_none=a["step_gib"], step_gib_full=b["step_gib"],
                         step_mem_full_over_none=b["step_gib"] / a["step_gib"])
            out[f"L={fmt_len(L)}"] = v
    del model
    return out


# ------------------------------------------------------------------------------------------------
# p: transformers as a peer
# ------------------------------------------------------------------------------------------------


def _hf_twin(model, ctx):
    """transformers ``Qwen2ForCausalLM`` with ``model``'s config and weights (sdpa, gradient checkpointing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chunkflow_pl.model.hf_io import to_hf_name

    c = model.cfg
    hf_cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                         num_key_value_heads=c.num_kv_heads, tie_word_embeddings=c.tie_word_embeddings,
                         rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                         max_position_embeddings=max(c.max_position_embeddings, 256 * K))
    with torch.device(ctx.device):
        hf = Qwen2ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=ctx.dtype)
    missing = hf.load_state_dict({to_hf_name(n): t for n, t in model.state_dict().items()}, strict=False)
    assert not missing.missing_keys or missing.missing_keys == ["lm_head.weight"], missing
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    return hf.train()


def _peak_of(fn, device):
    base = reset_peak(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / GiB if device.type == "cuda" else None
    return dt, peak


def section_p(ctx, budget):
    cfg = model_config(ctx.smoke, layers=2 if ctx.smoke else 4)
    C = 64 if ctx.smoke else 32 * K
    longest = 512 if ctx.smoke else 128 * K
    g = torch.Generator().manual_seed(7)
    hi = 5.3 if ctx.smoke else 8.3  # short ones log-uniform in ~100..4000 tokens (..200 in the smoke run)
    short = [int(x) for x in torch.exp(torch.empty(31).uniform_(4.6, hi, generator=g)).tolist()]
    model = build_model(ctx, cfg)
    hf = _hf_twin(model, ctx)
    out = {"model": f"{cfg.name}-shaped, {cfg.num_layers} layers, vocab {cfg.vocab_size}, {ctx.dtype}",
           "chunk": C, "k": 1, "kernel": _kernel_name(model, ctx), "short": short}
    def hf_step(seqs, targets, n_label):
        for s, t in zip(seqs, targets):
            logits = hf(input_ids=s.to(ctx.device)[None], use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], t.to(ctx.device), ignore_index=-100,
                                                     reduction="sum") / n_label
            loss.backward()

    hf_step(*_batch([C // 2], cfg.vocab_size, C)[1:])  # warm-up (kernel selection, allocator)
    while True:
        lengths = [longest, *short]
        batch, seqs, targets, n_label = _batch(lengths, cfg.vocab_size, C)
        hf.zero_grad(set_to_none=True)
        try:
            hf_s, hf_peak = _peak_of(lambda: hf_step(seqs, targets, n_label), ctx.device)  # noqa: B023
            break
        except torch.cuda.OutOfMemoryError as e:
            out.setdefault("hf_oom", []).append({"longest": longest, "error": short_error(e)})
            log(f"p transformers OOM with a {fmt_len(longest)} sequence: halving it")
            longest //= 2
            if longest < C:
                out["error"] = "transformers ran out of memory even below one chunk"
                return out
    hf_grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    hf.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    _run(model, _batch([C // 2], cfg.vocab_size, C)[0], 1, ctx.device)  # warm-up
    model.zero_grad(set_to_none=True)
    ours_s, ours_peak = _peak_of(lambda: _run(model, batch, 1, ctx.device), ctx.device)  # noqa: B023
    from chunkflow_pl.model.hf_io import to_hf_name
    from chunkflow_pl.strategy.layer_checkpoint import apply_layer_checkpoint

    diffs = [rel(p.grad, hf_grads[to_hf_name(n)]) for n, p in model.named_parameters() if to_hf_name(n) in hf_grads]
    tokens = sum(lengths)
    out.update(longest=longest, tokens=tokens, hf={"step_s": hf_s, "tokens_per_s": tokens / hf_s, "peak_gib": hf_peak},
               ours={"step_s": ours_s, "tokens_per_s": tokens / ours_s, "peak_gib": ours_peak},
               speedup=hf_s / ours_s, grad_rel_diff_max=max(diffs))
    if hf_peak:
        out["memory_ratio"] = ours_peak / hf_peak
    log(f"p {fmt_len(longest)} + 31 short ({tokens} tokens): transformers {tokens / hf_s:.0f} tok/s, peak "
        f"{hf_peak}; chunkflow {tokens / ours_s:.0f} tok/s, peak {ours_peak}; speed-up {hf_s / ours_s:.2f}x, "
        f"grad rel diff {max(diffs):.1e}")
    # the same batch with chunk.layer_checkpoint=full: transformers recomputes its layers too (like for like)
    if budget.left() > 2 * ours_s + 5:
        apply_layer_checkpoint(model, "full")
        model.zero_grad(set_to_none=True)
        ckpt_s, ckpt_peak = _peak_of(lambda: _run(model, batch, 1, ctx.device), ctx.device)  # noqa: B023
        out["ours_layer_checkpoint"] = {"step_s": ckpt_s, "tokens_per_s": tokens / ckpt_s, "peak_gib": ckpt_peak,
                                        "speedup": hf_s / ckpt_s}
        if hf_peak:
            out["ours_layer_checkpoint"]["memory_ratio"] = ckpt_peak / hf_peak
        log(f"p same batch, chunk.layer_checkpoint=full: chunkflow {tokens / ckpt_s:.0f} tok/s, peak {ckpt_peak}; "
            f"speed-up {hf_s / ckpt_s:.2f}x")
    return out


# ------------------------------------------------------------------------------------------------
# t: where the time goes
# ------------------------------------------------------------------------------------------------

CATEGORIES = (  # first match wins; lower-case substrings of CUDA kernel names
    ("attention", ("flash", "fmha", "attention", "flashattn")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "sm90_", "cublas", "matmul")),
    ("loss", ("cross_entropy", "log_softmax", "softmax", "nll")),
    ("copies", ("memcpy", "copy", "cat", "index")),
    ("elementwise", ("elementwise", "reduce", "vectorized", "unrolled", "pointwise", "sigmoid", "mul", "add")),
)


def categorise(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


class TimedKernels:
    """The model's kernels with CUDA events around every call, by block (own = causal, prefix = unmasked)."""

    def __init__(self, inner, device) -> None:
        self.inner, self.device, self.events = inner, device, []
        self.name = inner.name

    def _timed(self, tag, fn, *args):
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            r = fn(*args)
            self.events.append((tag, time.perf_counter() - t0))
            return r
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        r = fn(*args)
        e.record()
        self.events.append((tag, (s, e)))
        return r

    def forward(self, q, k, v, blk, causal, scale):
        return self._timed(f"{'own' if causal else 'prefix'} fwd", self.inner.forward, q, k, v, blk, causal, scale)

    def backward(self, do, q, k, v, o, lse, aux, blk, causal, scale):
        return self._timed(f"{'own' if causal else 'prefix'} bwd", self.inner.backward, do, q, k, v, o, lse, aux,
                           blk, causal, scale)

    def lse_rows(self, lse, blk):
        return self.inner.lse_rows(lse, blk)

    def lse_native(self, lse_HT, blk, spec):
        return self.inner.lse_native(lse_HT, blk, spec)

    def totals(self) -> dict:
        sync(self.device)
        out: dict = {}
        for tag, x in self.events:
            out[tag] = out.get(tag, 0.0) + (x if isinstance(x, float) else x[0].elapsed_time(x[1]) / 1e3)
        return out


def section_t(ctx, budget):
    from torch.profiler import ProfilerActivity, profile

    from chunkflow_pl.model import attention as attn_mod

    cfg = model_config(ctx.smoke, layers=2 if ctx.smoke else 4)
    L, C = (512, 64) if ctx.smoke else (128 * K, 32 * K)
    model = build_model(ctx, cfg)
    model.attention_backend = _half_backends(ctx)[-1]
    kern = _kernel_name(model, ctx)
    measure_point(ctx, model, C, C, False)  # warm-up (and compile) outside the trace
    timed = TimedKernels(attn_mod.select_kernels(model.attention_backend, ctx.device, ctx.dtype), ctx.device)
    real_merge = attn_mod.merge_blocks

    def timed_merge(*a):
        return timed._timed("lse merge", real_merge, *a)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    orig_select = attn_mod.select_kernels
    attn_mod.select_kernels = lambda *a, **k: timed
    attn_mod.merge_blocks = timed_merge
    try:
        with profile(activities=acts) as prof:
            row = measure_point(ctx, model, L, C, False)
    finally:
        attn_mod.select_kernels, attn_mod.merge_blocks = orig_select, real_merge
    by_cat: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) if ctx.device.type == "cuda" else None
        if ctx.device.type == "cuda":
            if not t or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = t
        else:  # CPU smoke: aten ops' self time stands in for kernels
            if not ev.key.startswith("aten::"):
                continue
            us = ev.self_cpu_time_total
        by_cat[categorise(ev.key)] = by_cat.get(categorise(ev.key), 0.0) + us / 1e6
        top[ev.key] = top.get(ev.key, 0.0) + us / 1e6
    total = sum(by_cat.values()) or 1.0
    out = {"L": L, "C": C, "kernel": kern, "step_s": row["step_s"], "mfu": row.get("mfu"),
           "kernel_s_by_category": {k: round(v, 4) for k, v in sorted(by_cat.items(), key=lambda x: -x[1])},
           "share": {k: round(v / total, 4) for k, v in by_cat.items()},
           "attention_blocks_s": {k: round(v, 4) for k, v in timed.totals().items()},
           "top_kernels_s": dict(sorted(((k[:90], round(v, 4)) for k, v in top.items()), key=lambda x: -x[1])[:12])}
    log(f"t {fmt_len(L)} ({kern}): step {row['step_s']:.2f}s, kernel time {total:.2f}s: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_cat.items(), key=lambda x: -x[1]))
        + "; attention blocks " + ", ".join(f"{k} {v:.2f}s" for k, v in out["attention_blocks_s"].items()))
    del model
    return out


# ------------------------------------------------------------------------------------------------
# m: a 1M-token pipeline stage on one device
# ------------------------------------------------------------------------------------------------


def section_m(ctx, budget):
    from chunkflow_pl.model.config import ModelConfig, get_preset

    if ctx.smoke:
        cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                          num_kv_heads=2, max_position_embeddings=4096, name="smoke")
        C, lengths = 64, [512, 4096]
    else:
        cfg = get_preset("qwen7b", num_layers=4, max_position_embeddings=1024 * K, tie_word_embeddings=False)
        C, lengths = 32 * K, [128 * K, 1024 * K]
    model = build_model(ctx, cfg)
    out = {"model": f"{cfg.name}: {cfg.num_layers} layers + embedding + head, vocab {cfg.vocab_size}, "
                    f"{cfg.num_params() / 1e9:.2f} B params, {ctx.dtype}",
           "chunk": C, "k": 1, "offload_state": True, "kernel": _kernel_name(model, ctx), "points": []}
    model.attention_backend = _half_backends(ctx)[-1]
    out["kernel"] = _kernel_name(model, ctx)
    measure_point(ctx, model, C // 2, C, True)  # warm-up
    for L in lengths:
        done = [p for p in out["points"] if "step_s" in p]
        need = done[-1]["step_s"] * (L / done[-1]["L"]) ** 2 * 0.95 + 10 if done else 10
        if budget.left() < need:
            out["points"].append({"L": L, "skipped": f"time (needs ~{need:.0f}s, {budget.left():.0f}s left)"})
            log(f"m L={fmt_len(L)}: skipped (needs ~{need:.0f}s, {budget.left():.0f}s left)")
            continue
        try:
            row = measure_point(ctx, model, L, C, True)
            row["state_where"] = "host (pinned), moved per layer by the copy engine"
            out["points"].append(row)
            log(f"m L={fmt_len(L)}: {row['step_s']:.1f}s, {row['tokens_per_s']:.0f} tok/s, MFU "
                f"{row.get('mfu', float('nan')):.1%}, HFU {row.get('hfu', float('nan')):.1%}, "
                + (f"peak {row['peak_gib']:.2f} GiB, " if "peak_gib" in row else "")
                + f"K/V state {row['state_gib']:.2f} GiB on the host, loss {row['loss']:.4f}, "
                f"grad norm {row['grad_norm']:.4e}")
        except Exception as e:  # noqa: BLE001
            out["points"].append({"L": L, "error": short_error(e), "trace": traceback.format_exc(limit=4)})
            log(f"m L={fmt_len(L)}: ERROR {short_error(e)}")
    pts = [p for p in out["points"] if "step_s" in p]
    if len(pts) == 2 and "peak_gib" in pts[0]:
        out["peak_ratio"] = pts[1]["peak_gib"] / pts[0]["peak_gib"]
    if pts:
        out["finite"] = all(torch.isfinite(torch.tensor([p["loss"], p["grad_norm"]])).all().item() for p in pts)
    del model
    return out


SECTIONS = {"g": section_g, "l": section_l, "p": section_p, "t": section_t, "m": section_m}
BUDGETS = {"g": 40, "l": 60, "p": 90, "t": 40, "m": 400}


def table_lines(results) -> list[str]:
    """gpu_check's summary table rows for these sections."""
    lines = []
    for sec, title in (("g", "g: whole-step gradients vs float64"), ("l", "l: layer checkpointing"),
                       ("p", "p: transformers peer"), ("t", "t: where the time goes"), ("m", "m: 1M-token stage")):
        r = results.get(sec)
        if not isinstance(r, dict):
            continue
        lines.append(f"-- {title}")
        if "error" in r or "skipped" in r:
            lines.append(f"   {r.get('error') or r.get('skipped')}")
        elif sec == "g":
            for k, v in r["kernels"].items():
                lines.append(f"   {k:<14} loss {v['loss_rel_err']:.1e}, worst grad {v['worst_grad_rel_err']:.1e} "
                             f"({v['worst_param']}), median grad {v['median_grad_rel_err']:.1e}")
        elif sec == "l":
            for p in r["points"]:
                lines.append(f"   {p['policy']:<5} L={fmt_len(p['L']):<5} " + (p["skipped"] if "skipped" in p else
                             f"{p['step_s']:.2f}s" + (f", step memory {p['step_gib']:.2f} GiB, peak {p['peak_gib']:.2f}"
                                                      if "step_gib" in p else "")))
        elif sec == "p":
            lines.append(f"   longest {fmt_len(r['longest'])} + 31 short, {r['tokens']} tokens: transformers "
                         f"{r['hf']['tokens_per_s']:.0f} tok/s (peak {r['hf']['peak_gib']}), chunkflow "
                         f"{r['ours']['tokens_per_s']:.0f} tok/s (peak {r['ours']['peak_gib']}): "
                         f"{r['speedup']:.2f}x" + (f", memory {r['memory_ratio']:.2f}x" if "memory_ratio" in r else ""))
            if "ours_layer_checkpoint" in r:
                c = r["ours_layer_checkpoint"]
                lines.append(f"   with chunk.layer_checkpoint=full: chunkflow {c['tokens_per_s']:.0f} tok/s (peak "
                             f"{c['peak_gib']}): {c['speedup']:.2f}x"
                             + (f", memory {c['memory_ratio']:.2f}x" if "memory_ratio" in c else ""))
        elif sec == "t":
            share = ", ".join(f"{k} {v:.0%}" for k, v in r["share"].items())
            lines.append(f"   {fmt_len(r['L'])} {r['kernel']}: {share}")
            blocks = ", ".join(f"{k} {v:.2f}s" for k, v in r["attention_blocks_s"].items())
            lines.append(f"   attention blocks: {blocks}")
        elif sec == "m":
            for p in r["points"]:
                lines.append(f"   L={fmt_len(p['L']):<6} " + (p.get("skipped") or p.get("error") or
                             f"{p['step_s']:.1f}s, {p['tokens_per_s']:.0f} tok/s, MFU {p.get('mfu', float('nan')):.1%}"
                             + (f", peak {p['peak_gib']:.2f} GiB" if "peak_gib" in p else "")))
            if "peak_ratio" in r:
                lines.append(f"   device peak 1M / 128K: {r['peak_ratio']:.3f}x (target <= 1.1)")
    return lines
