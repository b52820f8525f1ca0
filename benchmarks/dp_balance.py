"""Data-parallel balance with the trained model's cost model against the old fixed 7B-class weight.

    python benchmarks/dp_balance.py [--steps 10] [--warmup 2] [--no-measure]

Two parts:

* **predicted**: for each model shape and data set (``DATASETS``: "train" = the measured runs' batches),
  the chunks of every global batch assigned to ``dp`` ranks twice, with the old fixed weight
  (``data.balance.DEFAULT_CHUNK_COST``: one pair = 1 / (6 * 4096) token) and with the model's own cost
  (``CostModel.from_model(cfg, pp).balance_cost()``); "fixed, own view" is the max/mean rank cost the old
  balancer believed, the next two columns price both assignments with the model's cost (what its ranks
  would actually run, up to kernel efficiency). Mean over batches.
* **measured**: ``train.py`` under ``torchrun --standalone --nproc_per_node=2`` (``parallel.dp=2``, 1 thread
  per rank, CPU), once with the model's cost (as train.py does) and once with the fixed weight (this
  script's child mode replaces the assignment's cost in the data layer); ``train/dp_imbalance`` = max/mean
  over ranks of the time each spends in its chunks, mean of the steps after the warm-up.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunkflow_pl.data import balance, dataset  # noqa: E402
from chunkflow_pl.data.packing import build_chunk_plan  # noqa: E402
from chunkflow_pl.data.sources.synthetic import synthetic_lengths  # noqa: E402
from chunkflow_pl.model.config import ModelConfig, get_preset  # noqa: E402
from chunkflow_pl.schedule.cost import CostModel  # noqa: E402


@dataclass(frozen=True)
class Batches:
    """Synthetic long-tail global batches (``data.shuffle=false`` order, ``data.seed``) and their chunking."""

    name: str
    max_len: int
    global_batch: int
    chunk_size: int
    dp: int
    seed: int = 1234  # conf/data/synthetic.yaml

    def lengths(self, n: int) -> list[list[int]]:
        lens = synthetic_lengths(n * self.global_batch, self.max_len, 2, self.seed).tolist()  # the store's lengths
        return [lens[i * self.global_batch:(i + 1) * self.global_batch] for i in range(n)]


# "train": the measured runs' batches (RUN below); "32k", "128k": long-context batches for the large models
# (at 128k one 16-chunk chain outweighs a rank's share: the balance cannot split it)
DATASETS = [Batches("train", 8192, 32, 1024, 2), Batches("32k", 32768, 512, 4096, 4),
            Batches("128k", 131072, 512, 8192, 4)]
RUN = ["data.num_sequences=512", "data.max_len=8k", "data.global_batch_size=32", "data.shuffle=false",
       "chunk.size=1k", "chunk.k=1", "parallel.dp=2", "optim.warmup_steps=0", "trainer.accelerator=cpu",
       "logger=csv", "callbacks.progress=null", "callbacks.checkpoint=null", "trainer.enable_model_summary=false",
       "trainer.log_every_n_steps=1"]
WIDE = ["model.overrides.hidden_size=96", "model.overrides.intermediate_size=1000"]


@dataclass(frozen=True)
class Shape:
    name: str
    cfg: ModelConfig
    pp: int
    overrides: tuple[str, ...] | None = None  # train.py overrides for a measured run; None: predicted only


SHAPES = [
    Shape("tiny (h128, F352)", get_preset("tiny"), 1, ()),
    Shape("h96, F1000", get_preset("tiny", hidden_size=96, intermediate_size=1000), 1, tuple(WIDE)),
    Shape("qwen0.5b", get_preset("qwen0.5b"), 1),
    Shape("qwen7b", get_preset("qwen7b"), 1),
    Shape("qwen72b", get_preset("qwen72b"), 1),
    Shape("qwen72b, pp=8", get_preset("qwen72b"), 8),
]


def max_over_mean(costs: list[float]) -> float:
    mean = sum(costs) / len(costs)
    return max(costs) / mean if mean > 0 else 1.0


def predicted(shape: Shape, data: Batches, n_batches: int) -> dict[str, float]:
    cost = CostModel.from_model(shape.cfg, shape.pp).balance_cost()
    own, fixed_view, fixed_true, moved = [], [], [], 0
    dp = data.dp
    for lens in data.lengths(n_batches):
        plan = build_chunk_plan(lens, data.chunk_size)
        ours, old = balance.assign_to_ranks(plan, dp, cost), balance.assign_to_ranks(plan, dp)
        own.append(ours.imbalance)
        fixed_view.append(old.imbalance)
        fixed_true.append(max_over_mean([sum(cost(plan.chunks[c]) for c in r) for r in old.per_rank]))
        moved += ours.per_rank != old.per_rank
    ratio = cost.per_pair[-1] / cost.per_token[-1]
    return {"data": data.name, "model": shape.name, "pp": shape.pp, "dp": dp, "pair_over_token": ratio,
            "fixed_pair_over_token": balance.DEFAULT_A_ATTN, "fixed_own_view": statistics.mean(fixed_view),
            "fixed_under_model_cost": statistics.mean(fixed_true), "model_cost": statistics.mean(own),
            "batches_reassigned": moved, "batches": n_batches}


def measured(shape: Shape, mode: str, steps: int, warmup: int, out: Path) -> dict[str, float]:
    name = f"{shape.name}-{mode}".replace(" ", "").replace(",", "_").replace("(", "").replace(")", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    args = [*RUN, *shape.overrides, f"trainer.max_steps={steps}", f"hydra.run.dir={out / name}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--child", mode, "--", *args]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    (metrics,) = (out / name).glob("csv/version_*/metrics.csv")
    recs = [r for r in csv.DictReader(open(metrics)) if r.get("train/dp_imbalance")][warmup:]
    return {"model": shape.name, "cost": mode, "steps": len(recs),
            "dp_imbalance": statistics.mean(float(r["train/dp_imbalance"]) for r in recs),
            "step_s": statistics.median(float(r["train/step_time_s"]) for r in recs)}


def child(mode: str, overrides: list[str]) -> None:
    """One rank of a measured run: train.py's main, with the fixed weight in place of the model's if asked."""
    if mode == "fixed":
        def fixed_assign(plan, dp, cost_fn=None, **kw):  # the cost train.py passes is dropped
            return balance.assign_to_ranks(plan, dp, balance.DEFAULT_CHUNK_COST, **kw)

        dataset.assign_to_ranks = fixed_assign
    sys.argv = [str(ROOT / "train.py"), *overrides]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # as a script: Hydra finds conf/ beside it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", type=int, default=16, help="global batches for the predicted rows")
    ap.add_argument("--no-measure", action="store_true", help="predicted rows only (no training runs)")
    ap.add_argument("--child", choices=["model", "fixed"], help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.overrides)
        return 0
    pred = [predicted(s, d, args.batches) for d in DATASETS for s in SHAPES]
    meas = []
    if not args.no_measure:
        with tempfile.TemporaryDirectory() as tmp:
            for s in SHAPES:
                if s.overrides is not None:
                    for mode in ("fixed", "model"):
                        meas.append(measured(s, mode, args.steps, args.warmup, Path(tmp)))
    print(f"predicted max/mean rank cost, mean of {args.batches} global batches per data set")
    for d in DATASETS:
        print(f"  {d.name}: synthetic long tail, max_len {d.max_len}, global batch {d.global_batch}, "
              f"chunk.size {d.chunk_size}, dp {d.dp}")
    print(f"{'data':<7}{'model':<20}{'pp':>3}{'dp':>4}{'pair/token':>12}{'fixed, own view':>17}{'fixed':>8}"
          f"{'model':>8}{'reassigned':>12}")
    for r in pred:
        print(f"{r['data']:<7}{r['model']:<20}{r['pp']:>3}{r['dp']:>4}{r['pair_over_token']:>12.2e}"
              f"{r['fixed_own_view']:>17.4f}{r['fixed_under_model_cost']:>8.4f}{r['model_cost']:>8.4f}"
              f"{r['batches_reassigned']:>7}/{r['batches']}")
    if meas:
        print("measured train/dp_imbalance (torchrun, dp=2, 1 thread per rank)")
        print(f"{'model':<20}{'cost':>7}{'steps':>7}{'dp_imbalance':>14}{'step s':>9}")
        for r in meas:
            print(f"{r['model']:<20}{r['cost']:>7}{r['steps']:>7}{r['dp_imbalance']:>14.4f}{r['step_s']:>9.3f}")
    print(json.dumps({"benchmark": "dp_balance", "predicted": pred, "measured": meas}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
