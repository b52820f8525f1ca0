"""Data parallelism on this machine: dp=2 (torchrun, 2 processes) against 1 process, same global batches.

    python benchmarks/data_parallel.py [--steps 6] [--warmup 2]

Rows: 1 process with 1 thread, 1 process with 2 threads (what one process gets on a 2-core machine), and
dp=2 under ``torchrun --standalone`` with 1 thread per process. Each runs ``train.py`` (synthetic long-tail
data, a 4-layer hidden-256 model, fp32, AdamW) with the CSV logger; step time and tokens/s are the medians
of the steps after the warm-up; ``dp imbalance`` is max/mean over ranks of the time each rank spends in
its chunks before the gradient all-reduce (logged by the strategy as ``train/dp_imbalance``).
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
WORK = ["model.overrides.num_layers=4", "model.overrides.hidden_size=256", "model.overrides.num_heads=4",
        "model.overrides.num_kv_heads=2", "model.overrides.intermediate_size=704", "data.num_sequences=256",
        "data.max_len=8k", "data.global_batch_size=32", "chunk.size=2k", "chunk.k=1", "optim.warmup_steps=0",
        "trainer.accelerator=cpu", "logger=csv", "callbacks.progress=null", "callbacks.checkpoint=null",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]


def run(name: str, nproc: int, threads: int, steps: int, out: Path) -> list[dict[str, str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    args = [*WORK, f"trainer.max_steps={steps}", f"hydra.run.dir={out / name}", f"parallel.dp={nproc}"]
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "train.py"), *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    (metrics,) = (out / name).glob("csv/version_*/metrics.csv")
    return [r for r in csv.DictReader(open(metrics)) if r.get("train/step_time_s")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, threads in (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2),
                                     ("dp=2, 1 thread each", 2, 1)):
            tag = name.replace(" ", "_").replace(",", "").replace("=", "")
            recs = run(tag, nproc, threads, args.steps, Path(tmp))[args.warmup:]
            rows.append({
                "run": name,
                "step_s": statistics.median(float(r["train/step_time_s"]) for r in recs),
                "tokens_per_s": statistics.median(float(r["train/tokens_per_s"]) for r in recs),
                "dp_imbalance": statistics.mean(float(r.get("train/dp_imbalance") or 1.0) for r in recs),
                "loss_last": float(recs[-1]["train/loss"]),
            })
    base = rows[0]["tokens_per_s"]
    print(f"{'run':<24}{'step s':>9}{'tokens/s':>11}{'vs 1 proc/1 thr':>17}{'dp imbalance':>14}{'last loss':>11}")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
        print(f"{r['run']:<24}{r['step_s']:>9.2f}{r['tokens_per_s']:>11.0f}{r['speedup']:>16.2f}x"
              f"{r['dp_imbalance']:>14.2f}{r['loss_last']:>11.4f}")
    print(json.dumps({"benchmark": "data_parallel", "machine_cores": os.cpu_count(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
