"""Peak memory of ONE chunked training step versus sequence length, one fresh process per point.

ChunkFlow's claim: at a fixed chunk size ``C`` and number of kept chunks ``k``, the memory of a step
is flat in the sequence length ``L``, except for the key/value state of the earlier chunks (and its
gradient), which is O(L) but small (``2 * layers * kv_heads * head_dim`` numbers per token, twice).

Each point ``(L, C, k)`` runs in its own process (``--point L C K``): build the tiny model (float32),
an AdamW optimizer, one random sequence of ``L`` tokens (fixed seed), run a small warm-up step, take
the baseline, then one full step (chunk layout -> assemble -> StepRunner.run, training's step path ->
AdamW.step) and report on one JSON line:

    peak_kib         ru_maxrss after the step (the process's high-water mark; CPU)
    base_kib         resident set right before the step (after imports, model, optimizer, warm-up)
    delta_kib        peak - baseline = what the step added
    step_s           wall time of the step (step_cpu_s: process CPU time)
    chunks, recomputed_chunks, peak_state_bytes   from the plan and ``StepStats``

On CUDA the same fields come from ``torch.cuda.max_memory_allocated`` / ``memory_allocated``.
Children run with ``OMP_WAIT_POLICY=PASSIVE`` and (``--malloc fixed``, the default)
``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS tracks live tensors rather than glibc heap
fragmentation; see benchmarks/README.md for why and for measured results.

The parent runs the grid (sequentially: the machine has few cores), prints a table, the growth view
(delta at the longest L / delta at the shortest L per (C, k), with the target
``delta(L_max) <= 1.3 * delta(L_min) + state(L_max)``), the recompute-cost view (k = 1 versus
k = chain length), and one ``RESULT {json}`` line.

    python benchmarks/memory_vs_length.py --quick          # < 2 minutes
    python benchmarks/memory_vs_length.py                  # L in 4k,16k,64k; C in 1k,2k,4k; k in 1,2,4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chunkflow_pl.utils.sizes import parse_size  # noqa: E402

MiB = 1024**2
DEFAULT_LENGTHS = "4k,16k,64k"
DEFAULT_CHUNKS = "1k,2k,4k"
DEFAULT_KS = "1,2,4"
QUICK_LENGTHS = "2k,8k"
QUICK_CHUNKS = "512,1k"
QUICK_KS = "1,2"
TARGET_SLACK = 1.3  # delta(L_max) <= TARGET_SLACK * delta(L_min) + state(L_max)


# ------------------------------------------------------------------------------------------------
# child: one point
# ------------------------------------------------------------------------------------------------


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _one_step(model, opt, L: int, C: int, k: int, device, seed: int):
    """One training step on one random sequence of ``L`` tokens; returns (StepStats, chunks)."""
    import torch

    from chunkflow_pl.data.assemble import assemble_step
    from chunkflow_pl.data.labels import targets_from_labels
    from chunkflow_pl.data.packing import build_chunk_plan
    from chunkflow_pl.schedule.runner import StepRunner

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, model.cfg.vocab_size, (L,), generator=g)
    targets = targets_from_labels(seq)
    n_label = int((targets != -100).sum())
    plan = build_chunk_plan([L], C)
    batch = assemble_step(plan.chunks, [seq], [targets], [L], [0], n_label, 0, len(plan.chunks))
    stats = StepRunner(model.cfg, k, device).run(model, batch).stats
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stats, len(plan.chunks)


def run_point(L: int, C: int, k: int, args) -> dict:
    import torch

    from chunkflow_pl.model.config import get_preset
    from chunkflow_pl.model.decoder import Qwen2Decoder

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    cfg = get_preset(args.preset)
    model = Qwen2Decoder(cfg, attention_backend="sdpa").to(device=device, dtype=torch.float32)
    model.reset_parameters(0.02, generator=torch.Generator().manual_seed(args.seed))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    # Warm-up: a small chunked step (prefix path included) so one-time kernel / allocator / AdamW
    # state setup is neither in the step time nor in the step's memory delta.
    cw = min(C, 256)
    _one_step(model, opt, 2 * cw + 1, cw, 1, device, args.seed + 1)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_kib = torch.cuda.memory_allocated() // 1024
    else:
        base_kib = _current_rss_kib()
    base_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t0, c0 = time.perf_counter(), time.process_time()
    stats, n_chunks = _one_step(model, opt, L, C, k, device, args.seed)
    if cuda:
        torch.cuda.synchronize()
    step_s, step_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    peak_kib = (torch.cuda.max_memory_allocated() // 1024 if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {
        "L": L, "C": C, "k": k, "device": device.type, "memory": "cuda_allocated" if cuda else "rss",
        "chunks": n_chunks, "recomputed_chunks": stats.recomputed_chunks,
        "max_live_activations": stats.max_live_activations, "peak_state_bytes": stats.peak_state_bytes,
        "base_kib": int(base_kib), "base_maxrss_kib": int(base_maxrss_kib), "peak_kib": int(peak_kib),
        "delta_kib": int(peak_kib - base_kib), "step_s": step_s, "step_cpu_s": step_cpu_s,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "loss": stats.loss_sum / max(L - 1, 1), "tokens": stats.tokens,  # one sequence: L - 1 labels
    }


# ------------------------------------------------------------------------------------------------
# parent: grid, table, derived views
# ------------------------------------------------------------------------------------------------


def _sizes(text: str, key: str) -> list[int]:
    return sorted({parse_size(x, key) for x in text.split(",") if x.strip()})


def _fmt_size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def build_grid(lengths, chunks, ks, unchunked: bool, chain: bool) -> list[tuple[int, int, int]]:
    pts: list[tuple[int, int, int]] = []
    for L in lengths:
        for C in chunks:
            if C >= L:
                continue  # one chunk: the same run as the unchunked point (L, L, 1)
            kk = list(ks)
            if chain:
                kk.append(math.ceil(L / C))
            for k in kk:
                if (L, C, k) not in pts:
                    pts.append((L, C, k))
        if unchunked and (L, L, 1) not in pts:
            pts.append((L, L, 1))
    return pts


def child_env(args) -> dict[str, str]:
    env = dict(os.environ)
    # GNU OpenMP's default spin-wait makes 2 threads on a shared 2-core machine up to 10x slower
    # (measured); passive waiting keeps step times meaningful. An explicit user setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.malloc == "fixed":
        # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
        # same-sized tensors come from the heap and freed holes stay resident: RSS then measures heap
        # fragmentation too. A fixed threshold maps every block >= 64 KiB separately and returns it on
        # free, so the RSS high-water mark tracks the peak of live tensors (checked against the torch
        # profiler's allocation trace within ~2 MiB).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def run_child(L: int, C: int, k: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--point", str(L), str(C), str(k),
           "--seed", str(args.seed), "--threads", str(args.threads), "--preset", args.preset,
           "--device", args.device]
    base = {"L": L, "C": C, "k": k}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=str(ROOT),
                              env=child_env(args))
    except subprocess.TimeoutExpired:
        return {**base, "status": f"timeout>{args.timeout:g}s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        why = "killed (OOM?)" if proc.returncode in (-9, 137) else f"rc={proc.returncode}"
        return {**base, "status": f"failed {why}: {tail[0][:200]}", "wall_s": wall}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "status": "ok", "wall_s": wall}
    return {**base, "status": "failed: no JSON line from child", "wall_s": wall}


def _role(L: int, C: int, k: int):
    """What stays fixed when L grows: (C, k), or 'unchunked', or (C, 'chain')."""
    if C >= L:
        return "unchunked"
    return (C, "chain") if k >= math.ceil(L / C) else (C, k)


def predicted_seconds(L: int, C: int, k: int, done: list[dict]) -> float | None:
    """Step time extrapolated from the longest shorter L of the same role, as O(L^2) (attention)."""
    prev = [p for p in done if _ok(p) and p["L"] < L and _role(p["L"], p["C"], p["k"]) == _role(L, C, k)]
    if not prev:
        return None
    p = max(prev, key=lambda q: q["L"])
    return p["step_s"] * (L / p["L"]) ** 2


def _ok(p) -> bool:
    return p is not None and p.get("status") == "ok"


def _mib(kib) -> float:
    return kib / 1024


def _unchunked(p) -> bool:
    return p["C"] >= p["L"]


def table(points: list[dict]) -> str:
    mem = "peak RSS" if not points or points[0].get("memory", "rss") == "rss" else "peak alloc"
    head = (f"{'L':>5} {'C':>5} {'k':>3} {'chunks':>6} {'recomp':>6} {mem + ' MiB':>14} "
            f"{'step delta MiB':>14} {'state MiB':>9} {'delta-state':>11} {'step s':>7} {'cpu s':>7}  note")
    lines = [head, "-" * len(head)]
    for p in points:
        chain = math.ceil(p["L"] / p["C"])
        note = "unchunked" if _unchunked(p) else ("k=chain" if p["k"] >= chain else "")
        lead = f"{_fmt_size(p['L']):>5} {_fmt_size(p['C']):>5} {p['k']:>3}"
        if not _ok(p):
            lines.append(f"{lead} {'-':>6} {'-':>6} {'-':>14} {'-':>14} {'-':>9} {'-':>11} {'-':>7} {'-':>7}  "
                         f"{p['status']}")
            continue
        lines.append(
            f"{lead} {p['chunks']:>6} {p['recomputed_chunks']:>6} {_mib(p['peak_kib']):>14.1f} "
            f"{_mib(p['delta_kib']):>14.1f} {p['peak_state_bytes'] / MiB:>9.1f} "
            f"{_mib(p['delta_kib']) - p['peak_state_bytes'] / MiB:>11.1f} {p['step_s']:>7.2f} "
            f"{p['step_cpu_s']:>7.2f}  {note}".rstrip())
    return "\n".join(lines)


def growth_view(points: list[dict], ks: list[int]) -> list[dict]:
    """Per fixed (C, k): delta and state at the shortest / longest L that both ran, and the target."""
    by = {(p["L"], p["C"], p["k"]): p for p in points}
    lengths = sorted({p["L"] for p in points})
    chunks = sorted({p["C"] for p in points if not _unchunked(p)})
    rows = []
    groups = [(C, k) for C in chunks for k in ks] + [("L", 1)] + [(C, "chain") for C in chunks]
    for C, k in groups:
        # (C, k) at each L; C = L means one chunk (the unchunked run); for the unchunked group C = L.
        pts = []
        for L in lengths:
            if C == "L":
                p = by.get((L, L, 1))
            elif k == "chain":
                p = by.get((L, C, math.ceil(L / C))) if C < L else None
            else:
                p = by.get((L, C, k)) or (by.get((L, L, 1)) if C >= L else None)
            if _ok(p):
                pts.append(p)
        if len(pts) < 2:
            continue
        lo, hi = pts[0], pts[-1]
        d_lo, d_hi = lo["delta_kib"] * 1024, hi["delta_kib"] * 1024
        s_lo, s_hi = lo["peak_state_bytes"], hi["peak_state_bytes"]
        row = {"C": C, "k": k, "L_min": lo["L"], "L_max": hi["L"], "L_ratio": hi["L"] / lo["L"],
               "delta_min_mib": d_lo / MiB, "delta_max_mib": d_hi / MiB,
               "delta_growth": d_hi / d_lo if d_lo > 0 else None,
               "state_min_mib": s_lo / MiB, "state_max_mib": s_hi / MiB,
               "delta_minus_state_growth": (d_hi - s_hi) / (d_lo - s_lo) if d_lo - s_lo > 0 else None,
               "excess_mib": (d_hi - TARGET_SLACK * d_lo - s_hi) / MiB}
        if C != "L" and k != "chain":
            row["target_pass"] = d_hi <= TARGET_SLACK * d_lo + s_hi
        rows.append(row)
    return rows


def growth_text(rows: list[dict]) -> str:
    head = (f"{'C':>5} {'k':>5} {'L range':>11} {'delta MiB':>17} {'growth':>7} {'state MiB':>15} "
            f"{'(delta-state) growth':>20}  target: delta(Lmax) <= {TARGET_SLACK}*delta(Lmin) + state(Lmax)")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = "=L" if r["C"] == "L" else _fmt_size(r["C"])
        dg = f"{r['delta_growth']:.2f}x" if r["delta_growth"] is not None else "-"
        sg = f"{r['delta_minus_state_growth']:.2f}x" if r["delta_minus_state_growth"] is not None else "-"
        if "target_pass" in r:
            verdict = ("PASS" if r["target_pass"] else "FAIL") + f" (excess {r['excess_mib']:+.1f} MiB)"
        elif r["k"] == "chain":
            verdict = f"k = chain (keeps every chunk), for comparison: L grew {r['L_ratio']:.0f}x"
        else:
            verdict = f"unchunked, for comparison: L grew {r['L_ratio']:.0f}x"
        lines.append(
            f"{c:>5} {str(r['k']):>5} {_fmt_size(r['L_min']) + '->' + _fmt_size(r['L_max']):>11} "
            f"{r['delta_min_mib']:>7.1f} -> {r['delta_max_mib']:>7.1f} {dg:>7} "
            f"{r['state_min_mib']:>6.1f} -> {r['state_max_mib']:>6.1f} {sg:>20}  {verdict}")
    return "\n".join(lines)


def recompute_view(points: list[dict]) -> list[dict]:
    """Per (L, C) with a chain: step time at k = 1 (recompute all but the last chunk) vs k = chain."""
    by = {(p["L"], p["C"], p["k"]): p for p in points}
    rows = []
    for L, C in sorted({(p["L"], p["C"]) for p in points if not _unchunked(p)}):
        n = math.ceil(L / C)
        if n < 2:
            continue
        p1, pn = by.get((L, C, 1)), by.get((L, C, n))
        row = {"L": L, "C": C, "chain": n,
               "times": {str(p["k"]): p["step_s"] for p in points
                         if p["L"] == L and p["C"] == C and _ok(p)},
               # one extra forward of n-1 of n chunks; a forward ~ 1/3 of forward + backward. The
               # (n-1)/n share holds whether per-chunk cost is flat (MLP) or grows with the prefix.
               "expected_ratio": 1 + (n - 1) / (3 * n)}
        if _ok(p1) and _ok(pn):
            row.update(t_k1=p1["step_s"], t_chain=pn["step_s"], ratio=p1["step_s"] / pn["step_s"],
                       cpu_ratio=p1["step_cpu_s"] / pn["step_cpu_s"],
                       recomputed=p1["recomputed_chunks"],
                       delta_k1_mib=_mib(p1["delta_kib"]), delta_chain_mib=_mib(pn["delta_kib"]))
        rows.append(row)
    return rows


def recompute_text(rows: list[dict]) -> str:
    head = (f"{'L':>5} {'C':>5} {'chain':>5} {'recomp':>6} {'t k=1 s':>8} {'t k=chain s':>11} {'ratio':>6} "
            f"{'cpu ratio':>9} {'expected':>8} {'delta k=1 MiB':>13} {'delta k=chain MiB':>17}  all k: step s")
    lines = [head, "-" * len(head)]
    for r in rows:
        ks = ", ".join(f"k={k}: {t:.2f}" for k, t in sorted(r["times"].items(), key=lambda kv: int(kv[0])))
        lead = f"{_fmt_size(r['L']):>5} {_fmt_size(r['C']):>5} {r['chain']:>5}"
        if "ratio" not in r:
            lines.append(f"{lead} {'-':>6} {'-':>8} {'-':>11} {'-':>6} {'-':>9} {r['expected_ratio']:>8.2f} "
                         f"{'-':>13} {'-':>17}  {ks}")
            continue
        lines.append(
            f"{lead} {r['recomputed']:>6} {r['t_k1']:>8.2f} {r['t_chain']:>11.2f} {r['ratio']:>6.2f} "
            f"{r['cpu_ratio']:>9.2f} {r['expected_ratio']:>8.2f} {r['delta_k1_mib']:>13.1f} "
            f"{r['delta_chain_mib']:>17.1f}  {ks}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", nargs=3, metavar=("L", "C", "K"), help="(internal) run one point in this process")
    ap.add_argument("--lengths", default=None, help=f"sequence lengths (default {DEFAULT_LENGTHS})")
    ap.add_argument("--chunk-sizes", default=None, help=f"chunk.size values (default {DEFAULT_CHUNKS})")
    ap.add_argument("--ks", default=None, help=f"kept-chunk counts k (default {DEFAULT_KS})")
    ap.add_argument("--no-unchunked", action="store_true", help="skip the (C = L, k = 1) runs")
    ap.add_argument("--no-chain", action="store_true", help="skip the automatic k = ceil(L / C) runs")
    ap.add_argument("--quick", action="store_true",
                    help=f"small grid (L {QUICK_LENGTHS}, C {QUICK_CHUNKS}, k {QUICK_KS}); < 2 minutes")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per point before it counts as failed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each child")
    ap.add_argument("--preset", default="tiny", help="model preset (float32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                    help="fixed: children run with MALLOC_MMAP_THRESHOLD_=65536 so RSS tracks live tensors; "
                         "default: glibc's dynamic threshold (RSS includes heap fragmentation)")
    ap.add_argument("--no-skip", action="store_true",
                    help="run every point even when its O(L^2)-extrapolated step time exceeds --timeout")
    ap.add_argument("--json-out", default=None, help="also write the RESULT object to this file")
    args = ap.parse_args(argv)

    if args.point:
        L, C, k = (parse_size(x, n) for x, n in zip(args.point, ("L", "C", "K")))
        print(json.dumps(run_point(L, C, k, args)), flush=True)
        return 0

    lengths = _sizes(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS), "lengths")
    chunks = _sizes(args.chunk_sizes or (QUICK_CHUNKS if args.quick else DEFAULT_CHUNKS), "chunk-sizes")
    ks = sorted({int(x) for x in (args.ks or (QUICK_KS if args.quick else DEFAULT_KS)).split(",") if x.strip()})
    if min(ks) < 1:
        ap.error("--ks must be >= 1")
    grid = build_grid(lengths, chunks, ks, not args.no_unchunked, not args.no_chain)
    print(f"# {len(grid)} points, one process each, {args.threads} threads, device={args.device}, "
          f"preset={args.preset}, seed={args.seed}, timeout={args.timeout:g}s, malloc={args.malloc}",
          file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    points = []
    for i, (L, C, k) in enumerate(grid):
        guess = predicted_seconds(L, C, k, points)
        if guess is not None and guess > args.timeout and not args.no_skip:
            p = {"L": L, "C": C, "k": k, "status": f"skipped: predicted ~{guess:.0f}s > --timeout", "wall_s": 0.0}
        else:
            p = run_child(L, C, k, args)
        points.append(p)
        msg = (f"peak {_mib(p['peak_kib']):.0f} MiB, delta {_mib(p['delta_kib']):.0f} MiB, "
               f"step {p['step_s']:.1f}s" if _ok(p) else p["status"])
        print(f"# [{i + 1}/{len(grid)}] L={_fmt_size(L)} C={_fmt_size(C)} k={k}: {msg} "
              f"(wall {p['wall_s']:.1f}s, total {time.perf_counter() - t_start:.0f}s)", file=sys.stderr, flush=True)
    total_s = time.perf_counter() - t_start

    growth = growth_view(points, ks)
    recompute = recompute_view(points)
    mem = "ru_maxrss (CPU RSS high-water mark)" if all(p.get("memory", "rss") == "rss" for p in points if _ok(p)) \
        else "torch.cuda.max_memory_allocated"
    print(f"\nOne training step of the {args.preset} model (float32), one random sequence of L tokens, "
          f"fresh process per point; memory = {mem}; step delta = peak - resident before the step; "
          f"state = StepStats.peak_state_bytes (keys/values + their gradient).\n")
    print(table(points))
    print("\nGrowth at fixed (C, k): step delta at the longest L over the shortest L")
    print(growth_text(growth))
    print("\nRecompute cost: step time with k = 1 versus k = chain length (nothing recomputed)")
    print(recompute_text(recompute))
    print(f"\nTotal wall time: {total_s:.0f} s for {len(points)} points "
          f"({sum(not _ok(p) for p in points)} failed or skipped)")
    result = {"config": {"preset": args.preset, "dtype": "float32", "device": args.device, "threads": args.threads,
                         "seed": args.seed, "lengths": lengths, "chunk_sizes": chunks, "ks": ks,
                         "memory": mem, "malloc": args.malloc, "target_slack": TARGET_SLACK,
                         "omp_wait_policy": child_env(args).get("OMP_WAIT_POLICY")},
              "points": points, "growth": growth, "recompute": recompute, "total_s": total_s}
    line = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print("RESULT " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
