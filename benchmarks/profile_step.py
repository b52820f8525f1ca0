"""Where one training step's time goes: chunkflow_pl's executor against transformers, same tokens, one process.

The batch is ``throughput_vs_peers.py``'s default (16 LMSys-like sequences, longest 8-12x chunk.size), the
model its 4-layer hidden-256 Qwen2 in fp32 (same random weights in both). Each variant is one step's
forward+backward (no optimizer, no Lightning):

    hf          transformers Qwen2ForCausalLM, one sequence per micro-batch (row (a) of the peers benchmark)
    k1          ChunkExecutor, chunk.size=--chunk-size, k=1 (every dropped chunk recomputed)
    chain       the same with k = the longest chain (nothing recomputed)
    pack        chunk.size = the longest sequence (packing only)

Variants run in turns (hf, k1, chain, pack, hf, ...) for --repeats rounds after one warm-up round, so
a burst of load on this shared machine hits all of them alike; the table gives median step times and
ratios to ``hf`` (``*_best``: the same from each variant's fastest step; ratios, not absolute times, are
what to compare between runs). Per chunkflow variant,
the executor's own clock splits the median step into forward / recompute / backward time. With
``--ops VARIANT`` one more step of that variant runs under ``torch.profiler`` and its top operators by
self CPU time are printed. Last line: ``RESULT {json}``.

    python benchmarks/profile_step.py                       # about 1-2 minutes on 2 cores
    python benchmarks/profile_step.py --ops k1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.throughput_vs_peers import add_batch_and_model_args, hf_model, synthetic_batch  # noqa: E402
from chunkflow_pl.data.assemble import assemble_step  # noqa: E402
from chunkflow_pl.data.labels import targets_from_labels  # noqa: E402
from chunkflow_pl.data.packing import build_chunk_plan  # noqa: E402
from chunkflow_pl.model.config import ModelConfig  # noqa: E402
from chunkflow_pl.model.decoder import Qwen2Decoder  # noqa: E402
from chunkflow_pl.model.hf_io import load_pretrained  # noqa: E402
from chunkflow_pl.schedule.runner import StepRunner  # noqa: E402

VARIANTS = ("hf", "k1", "chain", "pack")


def build(args, work: Path):
    seqs = [torch.tensor(s) for s in synthetic_batch(args)]
    hf = hf_model(args, args.vocab)
    hf.config._attn_implementation = "sdpa"
    hf.save_pretrained(work)
    mcfg = ModelConfig.from_hf_dir(work)
    model = Qwen2Decoder(mcfg, loss_chunk=4096)
    load_pretrained(model, work, mcfg)
    return hf.train(), model.train(), seqs


def hf_step(hf, seqs, targets, n_label) -> dict:
    hf.zero_grad(set_to_none=True)
    for s, t in zip(seqs, targets):
        logits = hf(s[None], use_cache=False).logits[0]
        (F.cross_entropy(logits, t, ignore_index=-100, reduction="sum") / n_label).backward()
    return {}


def chunk_step(model, seqs, targets, n_label, chunk_size: int, k: int | None) -> dict:
    """One executor step; ``k=None``: the longest chain (no recompute). Returns seconds per phase."""
    lens = [len(s) for s in seqs]
    plan = build_chunk_plan(lens, chunk_size)
    batch = assemble_step(plan.chunks, seqs, targets, lens, list(range(len(seqs))), n_label, 0, len(plan.chunks))
    k = k or -(-max(lens) // chunk_size)
    model.zero_grad(set_to_none=True)
    run = StepRunner(model.cfg, k, torch.device("cpu")).run(model, batch, record=True)
    phases: dict[str, float] = {}
    for op, _, t0, t1 in run.timeline.events:
        phases[op] = phases.get(op, 0.0) + t1 - t0
    phases["chunks"] = len(batch.chunks)
    phases["recomputed"] = run.stats.recomputed_chunks
    return phases


def runner(name, args, hf, model, seqs, targets, n_label):
    longest = max(len(s) for s in seqs)
    if name == "hf":
        return lambda: hf_step(hf, seqs, targets, n_label)
    if name == "k1":
        return lambda: chunk_step(model, seqs, targets, n_label, args.chunk_size, 1)
    if name == "chain":
        return lambda: chunk_step(model, seqs, targets, n_label, args.chunk_size, None)
    if name == "pack":
        return lambda: chunk_step(model, seqs, targets, n_label, longest, 1)
    raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")


def op_table(fn, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--ops", default=None, help="one more step of this variant under torch.profiler")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--chunk-size", type=int, default=512)
    add_batch_and_model_args(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "hf" not in names:
        names.insert(0, "hf")
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        hf, model, seqs = build(args, Path(tmp))
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    lens = [len(s) for s in seqs]
    print(f"batch: {len(seqs)} sequences, {sum(lens)} tokens, longest {max(lens)}; chunk.size={args.chunk_size}; "
          f"{args.layers} layers, hidden {args.hidden}, fp32, torch threads {torch.get_num_threads()}", flush=True)
    fns = {n: runner(n, args, hf, model, seqs, targets, n_label) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats + 1):
        for n in names:
            t0 = time.perf_counter()
            ph = fns[n]()
            dt = time.perf_counter() - t0
            if r:  # round 0 warms up
                times[n].append(dt)
                phases[n].append(ph)
    med = {n: statistics.median(times[n]) for n in names}
    head = f"{'variant':<8} {'median s':>9} {'min s':>7} {'max s':>7} {'vs hf':>7} {'fwd s':>7} {'recomp s':>8} " \
           f"{'bwd s':>7} {'chunks':>6} {'recomp':>6}"
    print(head)
    print("-" * len(head))
    rows = {}
    for n in names:
        ph = {}
        if phases[n] and phases[n][0]:
            ph = {key: statistics.median(p.get(key, 0.0) for p in phases[n])
                  for key in ("forward", "recompute", "backward", "chunks", "recomputed")}
        rows[n] = {"median_s": med[n], "times": times[n], "vs_hf_time": med[n] / med["hf"], **ph}
        print(f"{n:<8} {med[n]:>9.3f} {min(times[n]):>7.3f} {max(times[n]):>7.3f} {med[n] / med['hf']:>6.2f}x "
              + (f"{ph['forward']:>7.3f} {ph['recompute']:>8.3f} {ph['backward']:>7.3f} {ph['chunks']:>6.0f} "
                 f"{ph['recomputed']:>6.0f}" if ph else ""))
    ratios = _ratios(med)
    best = {n: min(times[n]) for n in names}  # the least disturbed step of each: what the code costs
    ratios.update({key + "_best": v for key, v in _ratios(best).items()})
    for key, v in ratios.items():
        print(f"  {key}: {v:.2f}")
    if args.ops:
        print(f"\ntop operators of one '{args.ops}' step (self CPU time):")
        print(op_table(fns[args.ops], args.top))
    out = {"benchmark": "profile_step", "tokens": sum(lens), "longest": max(lens), "chunk_size": args.chunk_size,
           "repeats": args.repeats, "rows": rows, "ratios": ratios}
    print("RESULT " + json.dumps(out))
    return out


def _ratios(med: dict[str, float]) -> dict[str, float]:
    """Issue 11's ratios from step times: tokens/s against hf (= hf time / variant time), k1 over chain."""
    ratios = {}
    if "k1" in med:
        ratios["k1_tokens_per_s_vs_hf"] = med["hf"] / med["k1"]
    if "chain" in med:
        ratios["chain_tokens_per_s_vs_hf"] = med["hf"] / med["chain"]
    if "k1" in med and "chain" in med:
        ratios["k1_step_vs_chain"] = med["k1"] / med["chain"]
    if "pack" in med:
        ratios["pack_tokens_per_s_vs_hf"] = med["hf"] / med["pack"]
    return ratios


if __name__ == "__main__":
    main()
