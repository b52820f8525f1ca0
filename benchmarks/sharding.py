"""FSDP2-sharded data parallelism against replicated, on this machine: the same global batches and model.

    python benchmarks/sharding.py [--steps 5] [--warmup 2] [--rows 1,2,3,4]

Rows (each a ``train.py`` run, 1 thread per process, fp32, AdamW, synthetic long-tail data):
1 process; ``parallel.dp=2`` (replicated: FSDP2 with a shard size of 1); ``parallel.dp_shard=2`` with
``parallel.grad_reduce=every_backward`` (only sharded gradients held) and with ``last_backward`` (one
reduce-scatter per step, an unsharded gradient held until it). Per row: tokens/s (median of the steps after
the warm-up, from the CSV log), per-rank peak RSS, and per-rank model state (parameters + gradients +
optimizer state held, counted from the tensors' local shards by ``state_meter.StateMeter`` just before the
optimizer step). Targets (issue 21): dp_shard=2 model state <= 0.55x of dp=2; tokens/s >= 0.9x of dp=2.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
# ~34 M parameters (hidden 768, 4 layers): model state (~540 MB fp32 + AdamW) well above the process's baseline
WORK = ["model.overrides.num_layers=4", "model.overrides.hidden_size=768", "model.overrides.num_heads=6",
        "model.overrides.num_kv_heads=2", "model.overrides.intermediate_size=2048", "model.overrides.vocab_size=8192",
        "data.num_sequences=256", "data.max_len=4k", "data.global_batch_size=16", "chunk.size=2k", "chunk.k=1",
        "optim.warmup_steps=0", "trainer.accelerator=cpu", "logger=csv", "callbacks.progress=null",
        "callbacks.checkpoint=null", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "+callbacks.state_meter._target_=state_meter.StateMeter"]
ROWS = (("1 process", 1, []), ("dp=2 replicated", 2, ["parallel.dp=2"]),
        ("dp_shard=2 every_backward", 2, ["parallel.dp_shard=2", "parallel.grad_reduce=every_backward"]),
        ("dp_shard=2 last_backward", 2, ["parallel.dp_shard=2", "parallel.grad_reduce=last_backward"]))


def run(tag: str, nproc: int, layout: list[str], steps: int, out: Path) -> tuple[list[dict], list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    args = [*WORK, *layout, f"trainer.max_steps={steps}", f"hydra.run.dir={out / tag}", f"output_dir={out / tag}"]
    cmd = [sys.executable, str(ROOT / "train.py"), f"trainer.devices={nproc}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{tag} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    (metrics,) = (out / tag).glob("csv/version_*/metrics.csv")
    recs = [r for r in csv.DictReader(open(metrics)) if r.get("train/tokens_per_s")]
    state = [json.loads((out / tag / f"state_rank{r}.json").read_text()) for r in range(nproc)]
    return recs, state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", default="1,2,3,4", help="which rows, by number (1 process, dp=2, dp_shard x2)")
    args = ap.parse_args()
    wanted = {int(x) for x in args.rows.split(",")} | {2}  # dp=2 is the reference
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, nproc, layout) in enumerate(ROWS, 1):
            if i not in wanted:
                continue
            tag = name.replace(" ", "_").replace("=", "")
            recs, state = run(tag, nproc, layout, args.steps, Path(tmp))
            timed = recs[args.warmup:] or recs
            rows.append({"run": name, "processes": nproc,
                         "tokens_per_s": statistics.median(float(r["train/tokens_per_s"]) for r in timed),
                         "loss_last": float(recs[-1]["train/loss"]),
                         "state_mib": max(s["total"] for s in state) / MiB,
                         "params_mib": max(s["params"] for s in state) / MiB,
                         "grads_mib": max(s["grads"] for s in state) / MiB,
                         "optimizer_mib": max(s["optimizer"] for s in state) / MiB,
                         "peak_rss_mib": max(s["peak_rss"] for s in state) / MiB})
            print(f"done: {name}", flush=True)
    ref = next(r for r in rows if r["run"] == "dp=2 replicated")
    print(f"\n{'run':<28}{'tokens/s':>10}{'vs dp=2':>9}{'state MiB':>11}{'vs dp=2':>9}{'params':>8}{'grads':>8}"
          f"{'optim':>8}{'peak RSS MiB':>14}{'last loss':>11}")
    for r in rows:
        r["tokens_vs_dp2"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["state_vs_dp2"] = r["state_mib"] / ref["state_mib"]
        print(f"{r['run']:<28}{r['tokens_per_s']:>10.0f}{r['tokens_vs_dp2']:>8.2f}x{r['state_mib']:>11.1f}"
              f"{r['state_vs_dp2']:>8.2f}x{r['params_mib']:>8.1f}{r['grads_mib']:>8.1f}{r['optimizer_mib']:>8.1f}"
              f"{r['peak_rss_mib']:>14.0f}{r['loss_last']:>11.4f}")
    shard = [r for r in rows if r["run"].startswith("dp_shard")]
    targets = {"state_le_0.55x_dp2": all(r["state_vs_dp2"] <= 0.55 for r in shard),
               "tokens_ge_0.9x_dp2": all(r["tokens_vs_dp2"] >= 0.9 for r in shard)}
    print(f"targets: {targets}")
    print(json.dumps({"benchmark": "sharding", "machine_cores": os.cpu_count(), "rows": rows, "targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
