"""What a per-chunk gradient reduce costs in waiting, by simulation: ``grad_reduce`` last_backward vs every_backward.

Data-parallel ranks of a stage run *different* chunks (each its balanced share of the global batch), so a reduce
after every backward (``parallel.grad_reduce=every_backward``, ``strategy/sharding.py``) pairs the i-th backward of
every rank, and the rank whose chunks up to there were cheaper waits, at every reduce. A reduce once per step
(``last_backward``) waits once, for the whole step's imbalance. This script prices that with the planner's own
cost model (``CostModel.from_model``) on the workload of ``benchmarks/sharding.py`` (its model, sequences up to
4K, global batch 16, chunk 1K, k=1, dp=2), transfers free, so only waiting differs::

    rank 0  [F0 F1 F2 F3 B3]|[R2 B2]|[R1 B1]|...      a chain: its first segment holds four forwards
    rank 1  [F5 B5].........|[F6 B6]|[F7 B7]|...      '.': waiting for rank 0 at reduce 1
                            ^ reduce 1 (every_backward): both ranks, then reduce 2, ...

A *segment* is what a rank runs from one backward's end to the next's (the forwards and the recompute before
it included). Rows, summed over the global batches, as a ratio to the busier rank's compute (last_backward's
step, transfers aside):

- ``last_backward``: max over ranks of the sum of segments (waits once at the end);
- ``every_backward``: the sum over i of the slowest rank's i-th segment (each reduce synchronous);
- ``every_backward, units sorted``: the same, each rank running its units (chains, standalone chunks) largest
  first, so the ranks' long first segments line up;
- ``every_backward, one reduce in flight``: a rank issues reduce i and goes on, waiting for it only before it
  issues reduce i+1 (an asynchronous reduce that completes during the next segment: on CPU/gloo it would hold
  the reduced buffer, one unsharded gradient, across the next chunk's forwards, the memory every_backward is
  there to save).

    python benchmarks/reduce_lockstep.py [--seeds 0,1,2]     # seconds; a table, then one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chunkflow_pl.data.balance import assign_to_ranks, chunk_groups  # noqa: E402
from chunkflow_pl.data.packing import build_chunk_plan  # noqa: E402
from chunkflow_pl.data.sources.synthetic import synthetic_lengths  # noqa: E402
from chunkflow_pl.model.config import ModelConfig  # noqa: E402
from chunkflow_pl.schedule.cost import CostModel  # noqa: E402
from chunkflow_pl.schedule.pipeline_actions import Op  # noqa: E402
from chunkflow_pl.schedule.scheduler import plan_pipeline  # noqa: E402
from chunkflow_pl.schedule.simulator import simulate  # noqa: E402

# benchmarks/sharding.py's WORK overrides
CFG = ModelConfig(num_layers=4, hidden_size=768, num_heads=6, num_kv_heads=2, intermediate_size=2048,
                  vocab_size=8192)
SEQUENCES, MAX_LEN, BATCH, CHUNK, DP = 256, 4096, 16, 1024, 2
ROWS = ("last_backward", "every_backward", "every_backward, units sorted", "every_backward, one reduce in flight")


def segments(order: list[int], plan, lens: list[int], cost: CostModel) -> list[float]:
    """Durations from one backward's end to the next's, for one rank's chunks in ``order`` (pp = 1, k = 1)."""
    chunks = [plan.chunks[c] for c in order]
    sim = simulate(plan_pipeline(chunks, lens, 1, 1, cost=cost), chunks, lens, cost)
    out, acc = [], 0.0
    for e in sim.events:
        acc += e.end - e.start
        if e.op == Op.BACKWARD.value:
            out.append(acc)
            acc = 0.0
    return out


def lockstep(segs: list[list[float]]) -> float:
    """Every rank reduces after its i-th backward; the reduce starts when the last rank arrives."""
    n = max(len(s) for s in segs)  # shorter ranks reduce zeros at the end (padding chunks)
    return sum(max(s[i] if i < len(s) else 0.0 for s in segs) for i in range(n))


def one_in_flight(segs: list[list[float]]) -> float:
    """Reduce i completes when the last rank has issued it; a rank waits for it only before issuing reduce i+1."""
    n = max(len(s) for s in segs)
    issued = [0.0] * len(segs)
    done = 0.0  # completion of the previous reduce
    for i in range(n):
        issued = [max(t + (s[i] if i < len(s) else 0.0), done) for t, s in zip(issued, segs)]
        done = max(issued)
    return done


def by_units(mine: list[int], groups: list[list[int]], plan) -> list[int]:
    """This rank's chunks, its units (connected chunk groups) largest first, each unit's chunks in order."""
    unit_of = {c: i for i, g in enumerate(groups) for c in g}
    units: dict[int, list[int]] = {}
    for c in mine:
        units.setdefault(unit_of[c], []).append(c)
    key = lambda u: (-len(u), -sum(s.length for c in u for s in plan.chunks[c]), u[0])  # noqa: E731
    return [c for u in sorted(units.values(), key=key) for c in u]


def run(seed: int, cost: CostModel) -> dict[str, float]:
    lens_all = [int(n) for n in synthetic_lengths(SEQUENCES, MAX_LEN, seed=seed)]
    tot = dict.fromkeys(ROWS, 0.0)
    for b in range(0, SEQUENCES, BATCH):
        lens = lens_all[b:b + BATCH]
        plan = build_chunk_plan(lens, CHUNK)
        per_rank = assign_to_ranks(plan, DP, cost.balance_cost()).per_rank
        segs = [segments(mine, plan, lens, cost) for mine in per_rank]
        groups = chunk_groups(plan)
        sorted_segs = [segments(by_units(mine, groups, plan), plan, lens, cost) for mine in per_rank]
        tot["last_backward"] += max(sum(s) for s in segs)
        tot["every_backward"] += lockstep(segs)
        tot["every_backward, units sorted"] += lockstep(sorted_segs)
        tot["every_backward, one reduce in flight"] += one_in_flight(segs)
    return tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="synthetic data seeds, each 256 sequences (16 global batches)")
    a = ap.parse_args()
    cost = CostModel.from_model(CFG, 1, act_bytes=4)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = {r: 0.0 for r in ROWS}
    for seed in seeds:
        for r, v in run(seed, cost).items():
            rows[r] += v
    base = rows["last_backward"]
    print(f"{'schedule of the reduces':<40}{'step vs last_backward':>22}")
    for r in ROWS:
        print(f"{r:<40}{rows[r] / base:>21.3f}x")
    print(json.dumps({"benchmark": "reduce_lockstep", "seeds": seeds, "dp": DP, "chunk": CHUNK,
                      "step_vs_last_backward": {r: round(rows[r] / base, 4) for r in ROWS}}))


if __name__ == "__main__":
    main()
