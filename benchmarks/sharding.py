"""FSDP2-sharded data parallelism against replicated, on this machine: the same global batches and model.

    python benchmarks/sharding.py [--steps 4] [--warmup 1] [--rounds 1] [--quick]

Rows (each a ``train.py`` run on synthetic long-tail data, float32, AdamW, 2 cores in all):
1 process (2 threads); ``parallel.dp=2`` (replicated: FSDP2 with a shard size of 1, 1 thread per rank);
``parallel.dp_shard=2`` with ``parallel.grad_reduce=every_backward`` (a reduce-scatter after every chunk's
backward: only sharded gradients held between them) and with ``last_backward`` (one reduce-scatter per step,
an unsharded gradient accumulates until it). The model (~38 M parameters: hidden 768, 4 layers, vocabulary
8192) is big enough that its state (16 B/param with AdamW, ~600 MiB) dominates what a rank holds besides the
runtime, and a chunk's compute dominates Python overhead.

Per row: tokens/s = the timed steps' tokens / their wall time (steps after ``--warmup``, summed, so steps
with more chunks weigh more, as in a run); per-rank peak RSS (``VmHWM``, with glibc's mmap threshold fixed so
RSS follows live tensors, see memory_vs_length.py); per-rank model state (parameters + gradients + optimizer
state held, counted from the tensors' local shards by ``state_meter.StateMeter`` just before the optimizer
step); seconds per step in the data-parallel collectives (all-gather at step start, reduces). Ratios are
against dp=2 measured in the same invocation (this machine is shared: compare ratios, not absolute
numbers). ``--rounds N`` runs the rows N times interleaved and sums, so a load change hits every row.
Targets (issue 21): dp_shard=2 model state <= 0.55x of dp=2; tokens/s >= 0.9x of dp=2.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
WORK = ["model.overrides.num_layers=4", "model.overrides.hidden_size=768", "model.overrides.num_heads=6",
        "model.overrides.num_kv_heads=2", "model.overrides.intermediate_size=2048", "model.overrides.vocab_size=8192",
        "data.num_sequences=256", "data.max_len=4k", "data.global_batch_size=16", "chunk.size=1k", "chunk.k=1",
        "optim.warmup_steps=0", "trainer.accelerator=cpu", "logger=csv", "callbacks.progress=null",
        "callbacks.checkpoint=null", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "+callbacks.state_meter._target_=state_meter.StateMeter"]
# --quick: a smoke run of the script itself (seconds of compute per row), not a measurement
QUICK = ["model.overrides.num_layers=2", "model.overrides.hidden_size=128", "model.overrides.num_heads=4",
         "model.overrides.intermediate_size=256", "data.max_len=1k", "data.global_batch_size=8", "chunk.size=256"]
# (name, processes, threads per process, overrides)
ROWS = (("1 process", 1, 2, []),
        ("dp=2 replicated", 2, 1, ["parallel.dp=2"]),
        ("dp_shard=2 every_backward", 2, 1, ["parallel.dp_shard=2", "parallel.grad_reduce=every_backward"]),
        ("dp_shard=2 last_backward", 2, 1, ["parallel.dp_shard=2", "parallel.grad_reduce=last_backward"]),
        # FSDP2's default comm, gloo's own reduce_scatter (what strategy/gloo_comm.py replaces): not a target row
        ("every_backward, gloo RS", 2, 1, ["parallel.dp_shard=2", "parallel.grad_reduce=every_backward",
                                           "+callbacks.state_meter.gloo_reduce_scatter=true"]))
REF = "dp=2 replicated"


def run(tag: str, nproc: int, threads: int, layout: list[str], steps: int, out: Path,
        quick: bool = False, retried: bool = False) -> tuple[list[dict], list]:
    # OMP_WAIT_POLICY: spinning OpenMP threads ran 10x slower on this shared machine (memory_vs_length.py);
    # the mmap threshold keeps freed tensors from staying resident, so peak RSS follows the peak of live tensors.
    env = {"OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "65536", **os.environ,
           "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    args = [*WORK, *(QUICK if quick else []), *layout, f"trainer.max_steps={steps}", f"hydra.run.dir={out / tag}",
            f"output_dir={out / tag}"]
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer.devices={nproc}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode in (-9, -15, 137, 143) and not retried:  # killed from outside (a shared machine): once more
        print(f"{tag}: killed by a signal ({p.returncode}), running it again", flush=True)
        shutil.rmtree(out / tag, ignore_errors=True)
        return run(tag, nproc, threads, layout, steps, out, quick, retried=True)
    if p.returncode:
        raise SystemExit(f"{tag} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    (metrics,) = (out / tag).glob("csv/version_*/metrics.csv")
    recs = [r for r in csv.DictReader(open(metrics)) if r.get("train/tokens_per_s")]
    state = [json.loads((out / tag / f"state_rank{r}.json").read_text()) for r in range(nproc)]
    return recs, state


def collective_times(state: list[dict], step: int) -> dict[str, float]:
    """One step's collective seconds: per call the minimum over the ranks (the transfer: the last rank to arrive
    waits for nobody), and the spread (max - min: how long the earlier rank waited at that call)."""
    out = {"reduces": len(state[0]["steps"][step]["reduce_s"])}
    for key in ("gather_s", "reduce_s"):
        calls = list(zip(*(s["steps"][step][key] for s in state)))
        out[key] = sum(min(c) for c in calls)
        out[key.replace("_s", "_wait_s")] = sum(max(c) - min(c) for c in calls)
    return out


def summarise(name: str, nproc: int, runs: list[tuple[list[dict], list]], warmup: int) -> dict:
    tokens = secs = 0.0
    per_step: list[dict[str, float]] = []
    for recs, state in runs:
        for r in recs[warmup:]:
            secs += float(r["train/step_time_s"])
            tokens += float(r["train/tokens_per_s"]) * float(r["train/step_time_s"])
        per_step += [collective_times(state, i) for i in range(warmup, len(state[0]["steps"]))]
    state = [s for _, st in runs for s in st]
    row = {"run": name, "processes": nproc, "tokens_per_s": tokens / secs, "step_s": secs / len(per_step),
           **{k: statistics.mean(p[k] for p in per_step) for k in per_step[0]},
           "loss_last": float(runs[-1][0][-1]["train/loss"]),
           "state_mib": max(s["total"] for s in state) / MiB, "params_mib": max(s["params"] for s in state) / MiB,
           "grads_mib": max(s["grads"] for s in state) / MiB,
           "optimizer_mib": max(s["optimizer"] for s in state) / MiB,
           "peak_rss_mib": max(s["peak_rss"] for s in state) / MiB}
    return row


def table(rows: list[dict]) -> None:
    print(f"\n{'run':<27}{'tokens/s':>9}{'vs dp=2':>8}{'step s':>8}{'gather s':>9}{'reduce s':>9}{'wait s':>7}"
          f"{'n red':>6}{'state MiB':>10}{'vs dp=2':>8}{'params':>8}{'grads':>7}{'optim':>7}{'peak RSS MiB':>13}"
          f"{'last loss':>10}")
    for r in rows:
        print(f"{r['run']:<27}{r['tokens_per_s']:>9.0f}{r['tokens_vs_dp2']:>7.2f}x{r['step_s']:>8.2f}"
              f"{r['gather_s']:>9.2f}{r['reduce_s']:>9.2f}{r['reduce_wait_s']:>7.2f}{r['reduces']:>6.1f}"
              f"{r['state_mib']:>10.1f}{r['state_vs_dp2']:>7.2f}x{r['params_mib']:>8.1f}{r['grads_mib']:>7.1f}"
              f"{r['optimizer_mib']:>7.1f}{r['peak_rss_mib']:>13.0f}{r['loss_last']:>10.4f}")
    print("gather s / reduce s: seconds per step in the step-start all-gather / the gradient reduces (per call the "
          "fastest rank's time: the transfer); wait s: per step, how long a rank waited in a reduce for the other "
          "to arrive; n red: reduces per step")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of tokens/s (lazy init, AdamW state)")
    ap.add_argument("--rounds", type=int, default=1, help="run the rows this many times, interleaved")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps: checks the script, measures nothing")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    t0 = time.time()
    runs: dict[str, list] = {name: [] for name, *_ in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for name, nproc, threads, layout in ROWS:
                tag = "".join(ch if ch.isalnum() else "_" for ch in name) + f"_{rnd}"  # a Hydra-safe folder name
                runs[name].append(run(tag, nproc, threads, layout, args.steps, Path(tmp), args.quick))
                row = summarise(name, nproc, runs[name], args.warmup)  # printed now: a killed run keeps its rows
                print(f"done: {name} (round {rnd + 1}, {time.time() - t0:.0f} s): {row['tokens_per_s']:.0f} tokens/s, "
                      f"state {row['state_mib']:.1f} MiB, reduce {row['reduce_s']:.2f} s/step", flush=True)
    rows = [summarise(name, nproc, runs[name], args.warmup) for name, nproc, *_ in ROWS]
    ref = next(r for r in rows if r["run"] == REF)
    for r in rows:
        r["tokens_vs_dp2"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["state_vs_dp2"] = r["state_mib"] / ref["state_mib"]
        r["peak_rss_vs_dp2"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
    table(rows)
    shard = [r for r in rows if r["run"].startswith("dp_shard")]  # the product's rows
    targets = {"state_le_0.55x_dp2": all(r["state_vs_dp2"] <= 0.55 for r in shard),
               "tokens_ge_0.9x_dp2": all(r["tokens_vs_dp2"] >= 0.9 for r in shard)}
    print(f"targets: {targets}; wall {time.time() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"benchmark": "sharding", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="minutes"), "machine_cores": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "wall_s": round(time.time() - t0), "rows": rows, "targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
