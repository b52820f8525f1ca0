"""Measured chunk pipeline on this machine: ``torchrun --nproc_per_node=2 train.py parallel.pp=2`` vs 1 process.

With ``--virtual V`` the pipeline runs ``parallel.virtual_stages=V`` (pp x V blocks, interleaved), with
``--split-backward`` ``parallel.split_backward=true`` (each backward a B and a later W); the 1-process run then
splits its backwards too (each W right after its B), so it times every chunk's B and W.

Both runs train the same model on the same global batches (synthetic LMSys-like data, fixed seed, one
thread per process, float32, SGD) with the timeline callback recording every step; the first
``--warmup`` steps are left out. Reported per run (medians over the measured steps):

- ``step s``: the whole training step (throughput callback: planning, the chunk actions, gradient
  sync, optimizer), and ``span s``: the chunk actions only (end of the last compute action, measured
  from a start the stages share).
- ``bubble``: idle / (ranks x span) of the executed timeline (receive waits count as idle).
- for the pipeline, the same plan (re-derived here from the recorded chunks; it must equal the
  recorded one) simulated three ways (with virtual stages the simulator runs each rank's interleaved
  order, ``schedule/simulator.py``):
    ``replayed``   on the durations the pipeline run measured (what the plan's order alone costs;
                   the timeline callback's replay),
    ``predicted``  on the 1-process run's per-chunk durations of the same step (forward, B and W),
                   split over the blocks by the FLOP cost model's share of each block (a prediction made
                   without the run); ``gap``: measured bubble minus predicted, in percentage points
                   (the summary: its median over the measured steps),
    ``flops``      on the FLOP cost model the ranks plan with (``CostModel.from_model``), messages free.
- ``ratio``: pipeline step time / 1-process step time (2 processes on 2 cores; 0.5 would be perfect).

Then the per-step planning overhead every rank pays at the paper's scale (Qwen2.5-7B, global batch 256
of LMSys-like lengths): ``plan_pipeline``, ``check_pipeline_plan`` (``parallel.check_plan``, on by
default) and the fingerprint (``parallel.check_messages``), timed here on one CPU core.

Prints the tables and one ``RESULT {json}`` line. The CPU of this machine is shared with other jobs:
absolute times move with their load; run both configurations back to back and compare ratios.

    python benchmarks/pipeline_measured.py                              # 4 layers, hidden 384, ~5 min
    python benchmarks/pipeline_measured.py --hidden 256 --steps 3 --global-batch 8
    python benchmarks/pipeline_measured.py --virtual 2 --split-backward   # interleaved, B/W split, ~5 min
    python benchmarks/pipeline_measured.py --planning-only                # the planning table, seconds
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chunkflow_pl.data.types import Segment  # noqa: E402
from chunkflow_pl.model.config import get_preset  # noqa: E402
from chunkflow_pl.model.stages import split_blocks  # noqa: E402
from chunkflow_pl.schedule.cost import CostModel, MeasuredCost, action_time  # noqa: E402
from chunkflow_pl.schedule.pipeline_actions import Op  # noqa: E402
from chunkflow_pl.schedule.runner import pipeline_cost  # noqa: E402
from chunkflow_pl.schedule.scheduler import plan_pipeline  # noqa: E402
from chunkflow_pl.schedule.simulator import simulate  # noqa: E402

COMPUTE = {op.value for op in Op}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--max-len", default="4k")
    p.add_argument("--chunk-size", default="512")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--virtual", type=int, default=1, help="parallel.virtual_stages of the pipeline run")
    p.add_argument("--split-backward", action="store_true", help="parallel.split_backward=true in both runs")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--planning-only", action="store_true", help="only time planning + checking at paper scale")
    return p.parse_args()


def model_overrides(a: argparse.Namespace) -> dict[str, int]:
    return {"num_layers": a.layers, "hidden_size": a.hidden, "num_heads": a.heads, "num_kv_heads": a.kv_heads,
            "intermediate_size": a.intermediate, "vocab_size": a.vocab}


def run(a: argparse.Namespace, nproc: int, run_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable, str(ROOT / "train.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "train.py")]
    overrides = [f"model.overrides.{k}={v}" for k, v in model_overrides(a).items()] + [
        f"data.global_batch_size={a.global_batch}", f"data.max_len={a.max_len}", "data.num_sequences=512",
        f"chunk.size={a.chunk_size}", f"chunk.k={a.k}", f"parallel.pp={nproc}", f"trainer.max_steps={a.steps}",
        f"parallel.virtual_stages={a.virtual if nproc > 1 else 1}",
        f"parallel.split_backward={str(a.split_backward).lower()}",
        "optim=sgd", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "logger=csv", "trainer.log_every_n_steps=1", "callbacks.progress=null",
        "callbacks.checkpoint=null", "trainer.enable_model_summary=false", "callbacks.timeline.every_n_train_steps=1",
        f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    out = subprocess.run(launch + overrides, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(launch + overrides)}\nfailed:\n{(out.stdout + out.stderr)[-3000:]}")
    return time.perf_counter() - t0


def step_times(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return [float(r["train/step_time_s"]) for r in rows if r.get("train/step_time_s")]


def timelines(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "timeline").glob("step_*.json"))]


def predicted_durations(one: dict, plan, chunks, cost) -> dict[tuple[int, Op, int], float]:
    """1-process durations of each (op, chunk), split over the plan's blocks (stages, or ``pp x virtual`` blocks)
    by the FLOP model's share of each. With split backward both runs split: the 1-process B and W of a chunk
    time the pipeline's B(in) and W of it (a B's share priced as split, ``action_time``)."""
    whole: dict[tuple[str, int], float] = {}
    for op, c, t0, t1, *_ in one["stages"][0]["events"]:
        whole[(op, c)] = t1 - t0
    out = {}
    for s in range(plan.pp):
        for act in plan.compute(s):
            op, c = act.op, act.chunk
            measured = whole.get((op.value, c))
            if measured is None:  # recomputed here but not on one device: a forward's time
                measured = whole[(Op.FORWARD.value, c)] * cost.recompute
            # a dropped forward is dropped on every stage, and on one device too: its kv_only share is split
            share = (action_time(cost, act, s, chunks[c])
                     / sum(action_time(cost, act, x, chunks[c]) for x in range(plan.pp)))
            out[(s, op, c)] = measured * share
    return out


PLANNING_CASES = [("32k", "8k", 4, 1), ("32k", "2k", 8, 1), ("256k", "32k", 8, 2), ("256k", "8k", 8, 1)]


def planning_overhead() -> list[dict]:
    """Seconds to plan, check and fingerprint one step of a 7B pipeline (best of 3, one core)."""
    from chunkflow_pl.data.packing import build_chunk_plan
    from chunkflow_pl.data.sources.synthetic import synthetic_lengths
    from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
    from chunkflow_pl.utils.sizes import parse_size

    cfg = get_preset("qwen7b")
    rows = []
    for ctx, chunk, pp, k in PLANNING_CASES:
        lens = [int(x) for x in synthetic_lengths(256, parse_size(ctx), seed=3)]
        lens[0] = parse_size(ctx)  # one sequence at the full context, so a long chain is in the batch
        chunks = build_chunk_plan(lens, parse_size(chunk)).chunks
        cost = pipeline_cost(cfg, pp)
        best = {"plan": 1e9, "check": 1e9, "fingerprint": 1e9}
        for _ in range(3):
            t0 = time.perf_counter()
            plan = plan_pipeline(chunks, lens, pp, k, cost=cost)
            t1 = time.perf_counter()
            check_pipeline_plan(plan, chunks, lens)
            t2 = time.perf_counter()
            plan.fingerprint()
            t3 = time.perf_counter()
            for key, dt in (("plan", t1 - t0), ("check", t2 - t1), ("fingerprint", t3 - t2)):
                best[key] = min(best[key], dt)
        rows.append({"context": ctx, "chunk_size": chunk, "pp": pp, "k": k, "chunks": len(chunks),
                     "actions": sum(len(x) for x in plan.stages), **{f"{key}_ms": 1e3 * v for key, v in best.items()}})
    return rows


def print_planning(rows: list[dict]) -> None:
    print("\nplanning overhead per step and rank, Qwen2.5-7B, global batch 256 (best of 3, one core):")
    print("| context | chunk.size | pp | k | chunks | actions | plan ms | check ms | fingerprint ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['chunk_size']} | {r['pp']} | {r['k']} | {r['chunks']} | {r['actions']} | "
              f"{r['plan_ms']:.1f} | {r['check_ms']:.1f} | {r['fingerprint_ms']:.1f} |")


def main() -> None:
    a = parse_args()
    if a.planning_only:
        rows = planning_overhead()
        print_planning(rows)
        print("RESULT " + json.dumps({"planning": rows}))
        return
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="pipeline_measured_"))
    one_dir, pp_dir = work / "1_process", work / f"pp{a.pp}"
    load_before = os.getloadavg()
    wall_one = run(a, 1, one_dir)
    wall_pp = run(a, a.pp, pp_dir)
    cfg = get_preset("tiny", **model_overrides(a))
    cost = pipeline_cost(cfg, a.pp, a.virtual)  # what the ranks plan with (one stage per block)
    # The same FLOPs without message costs: at the planner's GPU-class defaults a small model's messages would
    # dominate its compute, which says nothing about this machine.
    flop_cost = CostModel.from_model(cfg, a.pp * a.virtual, link_bytes_per_s=None,
                                     stage_layers=[len(b.layer_ids) for b in split_blocks(cfg.num_layers, a.pp,
                                                                                          a.virtual)])

    ones, pps = timelines(one_dir), timelines(pp_dir)
    t_one, t_pp = step_times(one_dir), step_times(pp_dir)
    rows = []
    for one, rec in zip(ones[a.warmup:], pps[a.warmup:]):
        chunks = [[Segment(*seg) for seg in c] for c in rec["chunks"]]
        assert one["chunks"] == rec["chunks"], "the two runs saw different batches"
        plan = plan_pipeline(chunks, rec["seq_lens"], a.pp, a.k, cost=cost, virtual=a.virtual,
                             split_backward=a.split_backward)
        assert plan.text() == rec["plan"], "the recorded plan is not the one the ranks derive"
        pred = simulate(plan, chunks, rec["seq_lens"], MeasuredCost(predicted_durations(one, plan, chunks, cost),
                                                                    plan.pp))
        flops = simulate(plan, chunks, rec["seq_lens"], flop_cost)
        busy = [sum(t1 - t0 for op, _, t0, t1, *_ in st["events"] if op in COMPUTE) for st in rec["stages"]]
        rows.append({
            "step": rec["step"], "tokens": sum(rec["seq_lens"]), "chunks": sum(1 for c in chunks if c),
            "one_span": one["measured"]["step_time"], "pp_span": rec["measured"]["step_time"],
            "one_step": t_one[rec["step"]], "pp_step": t_pp[rec["step"]], "busy": busy,
            "bubble": rec["measured"]["bubble"], "replayed": rec["replayed"]["bubble"],
            "replayed_span": rec["replayed"]["step_time"], "predicted": pred.bubble_total,
            "predicted_span": pred.step_time, "flops": flops.bubble_total,
            "peak_live": [st["peak_live"] for st in rec["stages"]], "caps": [st["cap"] for st in rec["stages"]],
        })

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"model: {a.layers} layers, hidden {a.hidden}, {a.heads}/{a.kv_heads} heads, intermediate "
          f"{a.intermediate}, vocab {a.vocab}, float32; global batch {a.global_batch} (max_len {a.max_len}), "
          f"chunk.size {a.chunk_size}, k {a.k}; pp {a.pp} x virtual_stages {a.virtual}, split_backward "
          f"{a.split_backward}, vs 1 process (split_backward {a.split_backward}), 1 thread each; steps {a.steps} "
          f"(first {a.warmup} left out); load average {' '.join(f'{x:.2f}' for x in load_before)} before the runs")
    print("| step | tokens | chunks | 1-proc step s | pp step s | ratio | 1-proc span s | pp span s | busy s per rank"
          " | bubble measured | replayed | predicted (1-proc durations) | gap pp | flops model | peak live / cap |")
    print("|" + "---|" * 15)
    for r in rows:
        print(f"| {r['step']} | {r['tokens']} | {r['chunks']} | {r['one_step']:.2f} | {r['pp_step']:.2f} | "
              f"{r['pp_step'] / r['one_step']:.2f} | {r['one_span']:.2f} | {r['pp_span']:.2f} | "
              f"{' / '.join(f'{b:.2f}' for b in r['busy'])} | {r['bubble']:.1%} | {r['replayed']:.1%} | "
              f"{r['predicted']:.1%} (span {r['predicted_span']:.2f}) | "
              f"{100 * (r['bubble'] - r['predicted']):+.1f} | {r['flops']:.1%} | "
              f"{r['peak_live']} / {r['caps']} |")
    result = {
        "pp": a.pp, "virtual": a.virtual, "split_backward": a.split_backward, "k": a.k, "layers": a.layers,
        "hidden": a.hidden, "global_batch": a.global_batch,
        "chunk_size": a.chunk_size, "measured_steps": len(rows),
        "one_step_s": med("one_step"), "pp_step_s": med("pp_step"),
        "step_ratio": statistics.median(r["pp_step"] / r["one_step"] for r in rows),
        "span_ratio": statistics.median(r["pp_span"] / r["one_span"] for r in rows),
        "predicted_span_ratio": statistics.median(r["predicted_span"] / r["one_span"] for r in rows),
        "bubble_measured": med("bubble"), "bubble_replayed": med("replayed"), "bubble_predicted": med("predicted"),
        "bubble_flops_model": med("flops"), "wall_s": {"one": round(wall_one, 1), "pp": round(wall_pp, 1)},
        "load_avg_before": load_before, "load_avg_1min": os.getloadavg()[0], "workdir": str(work),
    }
    result["gap_points"] = statistics.median(100 * (r["bubble"] - r["predicted"]) for r in rows)  # step by step
    result["planning"] = planning = planning_overhead()
    print(f"medians: step ratio {result['step_ratio']:.2f} (span ratio {result['span_ratio']:.2f}, predicted "
          f"{result['predicted_span_ratio']:.2f}); bubble measured {result['bubble_measured']:.1%}, replayed "
          f"{result['bubble_replayed']:.1%}, predicted {result['bubble_predicted']:.1%} (measured - predicted, "
          f"median over steps {result['gap_points']:+.1f} points), FLOP model "
          f"{result['bubble_flops_model']:.1%}; load average {result['load_avg_1min']:.1f} on {os.cpu_count()} CPUs")
    print_planning(planning)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
