"""Simulated pipeline step time and bubbles: ChunkFlow's chunk pipeline vs 1F1B over whole sequences.

The paper's setting: Qwen2.5-7B/14B/32B/72B architectures, 32K and 256K maximum context, pp 2..8,
global batches of 256 sequences drawn from the LMSys-like long-tail length distribution
(``data/sources/synthetic.py``). For each batch and pipeline depth, two plans of the same work are
simulated with the same cost model (``CostModel.from_model``: FLOPs per stage at a fixed
throughput, messages over a fixed link; ``--no-comm`` makes messages free):

- **chunkflow**: chunk construction (Algorithm 1, ``--chunk-size``), data-parallel balance
  (``--dp``), ``plan_pipeline`` (state-aware 1F1B, ``--k``, ``--max-open-chains``); recomputes of
  dropped chunks are real work in its step time. One row per ``--virtual`` v (default 1 and 2) and
  ``--split-backward`` mode (default both): v > 1 interleaves v layer blocks per rank (``pp * v`` blocks,
  costed with ``CostModel.from_model(cfg, pp * v)``; no row where ``pp * v`` exceeds the model's layers;
  bubbles are then per rank); ``split`` "yes" plans with ``split_backward=True`` (every backward split
  into B, input and state gradients, and W, the weight gradient, run where the rank would idle; same
  caps, a chunk holds its slot until its W; ``CostModel`` prices the halves from FLOPs).
  ``--caps uniform`` gives every block block 0's live-chunk cap ``max(pp v, k)`` instead of the 1F1B
  depth ``max(pp v - b, k)`` (zero-bubble ZB-H1's memory rule: the busiest block's count unchanged,
  later blocks may hold as many chunks, e.g. ``W``-pending ones). ``--balance head`` cuts the layers
  with ``schedule/balance_layers.py`` (each block's forward FLOPs, the LM head's included, as even as
  whole layers allow) instead of evenly; the 1F1B baseline keeps the even cut.
- **1f1b**: one whole sequence per micro-batch, in data order, 1F1B (the same list scheduler on
  standalone chunks gives exactly the textbook 1F1B order; caps ``pp - s``), nothing recomputed,
  data-parallel ranks get sequences round-robin. This is the Megatron-style baseline, and a kind
  one: Megatron fixes micro-batch shapes, so it would pad or pack to the context length.

Every plan is checked (``check_pipeline_plan``) before it is simulated. Reported per (model,
context, pp, v, split), summed over ``--batches`` global batches: step time, bubble fraction (idle /
(pp x step), pp ranks) and its floor (the bubble left at ``lower_bound``: rank imbalance and the
dependency path, which no interleaving removes), recompute share of chunkflow's compute, speed-up =
1f1b time / chunkflow time (the baseline is neither interleaved nor split). A table, one summary line
per mode (v, split: speed-up min / geometric mean / max, bubble range per pp), then one ``RESULT
{json}`` line: rows carry ``virtual`` and ``split_backward``; ``modes`` maps ``"v=1 split=no"`` etc. to
each mode's summary; ``by_virtual`` the unsplit rows' speed-up per v; the top-level ``speedup_*`` keys
the smallest v unsplit, ``split_speedup_*`` the smallest v split. ``--timeline DIR`` draws the plans
of the first batch of one configuration (``--timeline-config``) as PNG Gantt charts, one row per rank.

    python benchmarks/pipeline_bubbles.py                    # full grid, < 2 minutes on 2 CPU cores
    python benchmarks/pipeline_bubbles.py --models 7b --contexts 256k --pps 4 --timeline /tmp/tl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chunkflow_pl.data.balance import assign_to_ranks  # noqa: E402
from chunkflow_pl.data.packing import build_chunk_plan  # noqa: E402
from chunkflow_pl.data.sources.synthetic import synthetic_lengths  # noqa: E402
from chunkflow_pl.data.types import Segment  # noqa: E402
from chunkflow_pl.model.config import get_preset  # noqa: E402
from chunkflow_pl.schedule.balance_layers import balance_layers  # noqa: E402
from chunkflow_pl.schedule.cost import CostModel  # noqa: E402
from chunkflow_pl.schedule.pipeline_actions import Op  # noqa: E402
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan  # noqa: E402
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline  # noqa: E402
from chunkflow_pl.schedule.simulator import SimResult, lower_bound, simulate  # noqa: E402
from chunkflow_pl.utils.sizes import parse_size  # noqa: E402

MODELS = {"7b": "qwen7b", "14b": "qwen14b", "32b": "qwen32b", "72b": "qwen72b"}
DEFAULT_CHUNK = {32 * 1024: 8 * 1024, 256 * 1024: 32 * 1024}  # context -> chunk size (our choice)


@dataclass
class Totals:
    time: float = 0.0  # summed step time over batches
    idle: float = 0.0  # summed idle stage-time
    stage_time: float = 0.0  # summed pp x step time
    recompute: float = 0.0
    busy: float = 0.0
    bound: float = 0.0  # summed max(busiest stage, critical path): no schedule of the same work is shorter
    micro_steps: int = 0
    peak_live: int = 0

    def add(self, result: SimResult, pp: int) -> None:
        self.time += result.step_time
        self.idle += result.bubble_total * pp * result.step_time
        self.stage_time += pp * result.step_time
        self.busy += sum(result.busy)
        self.recompute += sum(e.end - e.start for e in result.events if e.op == Op.RECOMPUTE.value)
        self.peak_live = max(self.peak_live, max(result.peak_live))

    @property
    def bubble(self) -> float:
        return self.idle / self.stage_time if self.stage_time else 0.0

    def bubble_floor(self, pp: int) -> float:
        """The bubble a schedule reaching the lower bound would leave: the stages' imbalance (the busiest
        one sets the step) and the dependency path, not the interleaving."""
        return 1.0 - self.busy / (pp * self.bound) if self.bound else 0.0


def run_replicas(replicas: list[tuple[list[list[Segment]], list[int]]], pp: int, k: int, cost: CostModel,
                 max_open: int | None, caps: tuple[int, ...] | None, virtual: int = 1,
                 split: bool = False) -> tuple[SimResult, float]:
    """Plan, check and simulate each data-parallel replica; the step waits for the slowest.

    Returns the slowest replica's result and the largest lower bound over replicas."""
    slowest, bound = None, 0.0
    for chunks, lens in replicas:
        plan = plan_pipeline(chunks, lens, pp, k, cost=cost, caps=caps, max_open_chains=max_open, virtual=virtual,
                             split_backward=split)
        check_pipeline_plan(plan, chunks, lens)
        result = simulate(plan, chunks, lens, cost)
        bound = max(bound, *lower_bound(plan, chunks, lens, cost))
        if slowest is None or result.step_time > slowest.step_time:
            slowest = result
    return slowest, bound


def chunkflow_replicas(lengths: list[int], chunk_size: int, dp: int) -> list[tuple[list[list[Segment]], list[int]]]:
    plan = build_chunk_plan(lengths, chunk_size)
    assignment = assign_to_ranks(plan, dp)
    return [([plan.chunks[c] for c in rank], lengths) for rank in assignment.per_rank]


def whole_sequence_replicas(lengths: list[int], dp: int) -> list[tuple[list[list[Segment]], list[int]]]:
    return [([[Segment(s, 0, lengths[s])] for s in range(r, len(lengths), dp) if lengths[s] > 0], lengths)
            for r in range(dp)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="7b,14b,32b,72b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--contexts", default="32k,256k", help="max sequence lengths (data.max_len)")
    ap.add_argument("--pps", default="2,3,4,5,6,7,8")
    ap.add_argument("--batches", type=int, default=4, help="global batches per configuration")
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--chunk-size", default=None, help="one size for every context (default: 32k->8k, 256k->32k)")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--virtual", default="1,2", help="layer blocks per rank, one chunkflow row each (interleaved)")
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--max-open-chains", type=int, default=1, help="0 = no limit")
    ap.add_argument("--caps", choices=("1f1b", "uniform"), default="1f1b",
                    help="chunkflow's live-chunk caps: max(pp - s, k) per stage, or max(pp, k) on every stage")
    ap.add_argument("--no-comm", action="store_true", help="free messages (default: 50 GB/s, 20 us)")
    ap.add_argument("--split-backward", choices=("off", "on", "both"), default="both",
                    help="chunkflow rows without / with split backward (B and W), or both side by side")
    ap.add_argument("--balance", choices=("even", "head"), default="even",
                    help="chunkflow's layer cut: even, or FLOPs-even with the LM head counted (balance_layers.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeline", default=None, help="directory for PNG Gantt charts of one configuration")
    ap.add_argument("--timeline-config", default="7b,256k,4", help="model,context,pp drawn by --timeline")
    args = ap.parse_args()

    models = [m.strip().lower() for m in args.models.split(",")]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    contexts = [parse_size(c) for c in args.contexts.split(",")]
    pps = [int(p) for p in args.pps.split(",")]
    virtuals = [int(v) for v in args.virtual.split(",")]
    if min(virtuals) < 1:
        ap.error(f"--virtual: layer blocks per rank must be >= 1, got {virtuals}")
    max_open = args.max_open_chains or None
    draw = args.timeline_config.split(",")
    draw_key = (draw[0].lower(), parse_size(draw[1]), int(draw[2]))
    splits = {"off": [False], "on": [True], "both": [False, True]}[args.split_backward]
    link = None if args.no_comm else 50e9

    t0 = time.perf_counter()
    rows = []
    for ctx in contexts:
        chunk_size = parse_size(args.chunk_size) if args.chunk_size else DEFAULT_CHUNK.get(ctx, min(ctx, 32 * 1024))
        all_lengths = synthetic_lengths(args.global_batch * args.batches, max_len=ctx, seed=args.seed).tolist()
        batches = [all_lengths[i * args.global_batch:(i + 1) * args.global_batch] for i in range(args.batches)]
        cf_reps = [chunkflow_replicas(b, chunk_size, args.dp) for b in batches]
        base_reps = [whole_sequence_replicas(b, args.dp) for b in batches]
        for m in models:
            cfg = get_preset(MODELS[m])
            for pp in pps:
                base = Totals()
                cost = CostModel.from_model(cfg, pp, link_bytes_per_s=link)
                for i in range(args.batches):
                    # 1F1B keeps every in-flight micro-batch whole: caps pp - s, k irrelevant (nothing split)
                    r_base, b_base = run_replicas(base_reps[i], pp, 1, cost, None, default_caps(pp, 1))
                    base.add(r_base, pp)
                    base.bound += b_base
                base.micro_steps = max(len(c) for rep in base_reps for c, _ in rep)
                for v, split in ((v, split) for v in virtuals for split in splits):
                    if pp * v > cfg.num_layers or (v > 1 and pp < 2):
                        continue  # a block needs a layer; interleaving needs two ranks
                    layers = balance_layers(cfg, pp * v, chunk_size) if args.balance == "head" else None
                    block_cost = CostModel.from_model(cfg, pp * v, stage_layers=layers, link_bytes_per_s=link)
                    cf_caps = (max(pp * v, args.k),) * (pp * v) if args.caps == "uniform" else None
                    cf = Totals()
                    for i in range(args.batches):
                        r_cf, b_cf = run_replicas(cf_reps[i], pp, args.k, block_cost, max_open, cf_caps, v, split)
                        cf.add(r_cf, pp)
                        cf.bound += b_cf
                        if args.timeline and i == 0 and (m, ctx, pp) == draw_key:
                            r_base, _ = run_replicas(base_reps[i], pp, 1, cost, None, default_caps(pp, 1))
                            _draw(args.timeline, m, ctx, pp, v, split, r_cf, r_base,
                                  with_base=(v, split) == (virtuals[0], splits[0]))
                    cf.micro_steps = max(len(c) for rep in cf_reps for c, _ in rep)
                    rows.append(dict(
                        model=MODELS[m], context=ctx, chunk_size=chunk_size, pp=pp, virtual=v, split_backward=split,
                        chunkflow_step_s=cf.time / args.batches, baseline_step_s=base.time / args.batches,
                        speedup=base.time / cf.time,
                        chunkflow_bubble=cf.bubble, baseline_bubble=base.bubble,
                        chunkflow_bubble_floor=cf.bubble_floor(pp),
                        chunkflow_recompute_share=cf.recompute / cf.busy,
                        chunkflow_over_bound=cf.time / cf.bound, baseline_over_bound=base.time / base.bound,
                        chunkflow_max_micro_steps=cf.micro_steps, baseline_max_micro_steps=base.micro_steps,
                        chunkflow_peak_live=cf.peak_live, baseline_peak_live=base.peak_live,
                    ))
    elapsed = time.perf_counter() - t0

    print(f"{'model':<8} {'ctx':>5} {'C':>4} {'pp':>3} {'v':>2} {'split':>5} {'chunkflow s':>12} {'1f1b s':>9} "
          f"{'speed-up':>9} {'bubble cf':>10} {'cf floor':>9} {'bubble 1f1b':>12} {'recompute':>10} {'cf/bound':>9} "
          f"{'1f1b/bound':>11}")
    for r in rows:
        print(f"{r['model']:<8} {r['context'] // 1024:>4}K {r['chunk_size'] // 1024:>3}K {r['pp']:>3} "
              f"{r['virtual']:>2} {'yes' if r['split_backward'] else 'no':>5} "
              f"{r['chunkflow_step_s']:>12.2f} {r['baseline_step_s']:>9.2f} {r['speedup']:>8.2f}x "
              f"{r['chunkflow_bubble']:>10.1%} {r['chunkflow_bubble_floor']:>9.1%} {r['baseline_bubble']:>12.1%} "
              f"{r['chunkflow_recompute_share']:>10.1%} "
              f"{r['chunkflow_over_bound']:>9.2f} {r['baseline_over_bound']:>11.2f}")
    modes: dict[str, dict] = {}
    for v, split in ((v, split) for v in virtuals for split in splits):
        mine = [r for r in rows if r["virtual"] == v and r["split_backward"] == split]
        if not mine:
            continue
        speedups = [r["speedup"] for r in mine]
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        bubbles = {pp: [r["chunkflow_bubble"] for r in mine if r["pp"] == pp] for pp in pps}
        span = ", ".join(f"pp={pp} {min(b):.1%}-{max(b):.1%}" for pp, b in bubbles.items() if b)
        print(f"v={v} split backward {'yes' if split else 'no'}: speed-up min {min(speedups):.2f}x, geometric mean "
              f"{geo:.2f}x, max {max(speedups):.2f}x ({len(mine)} configurations x {args.batches} batches); "
              f"chunkflow bubble {span}")
        modes[f"v={v} split={'yes' if split else 'no'}"] = dict(
            virtual=v, split_backward=split, configurations=len(mine),
            speedup_min=min(speedups), speedup_geomean=geo, speedup_max=max(speedups),
            bubble_by_pp={str(pp): [min(b), max(b)] for pp, b in bubbles.items() if b})
    print(f"({len(rows)} rows x {args.batches} batches, {elapsed:.1f} s)")
    keys = ("speedup_min", "speedup_geomean", "speedup_max")
    v0 = min(virtuals)
    summary: dict[str, float] = {}
    for split, prefix in ((False, ""), (True, "split_")):
        mode = modes.get(f"v={v0} split={'yes' if split else 'no'}")
        if mode:  # the top-level keys keep their meaning: the smallest v (1 by default)
            summary.update({prefix + k: mode[k] for k in keys})
    by_v = {str(m["virtual"]): {k: m[k] for k in keys} for m in modes.values() if not m["split_backward"]}
    settings = dict(models=[MODELS[m] for m in models], contexts=contexts, pps=pps, virtual=virtuals,
                    batches=args.batches, global_batch=args.global_batch, k=args.k, dp=args.dp,
                    max_open_chains=max_open, comm=not args.no_comm, seed=args.seed, chunk_size=args.chunk_size,
                    split_backward=args.split_backward, caps=args.caps, balance=args.balance)
    print("RESULT " + json.dumps(dict(settings=settings, rows=rows, elapsed_s=elapsed, modes=modes, by_virtual=by_v,
                                      **summary)))


def _draw(directory: str, model: str, ctx: int, pp: int, v: int, split: bool, cf: SimResult, base: SimResult,
          with_base: bool) -> None:
    """Gantt charts of one batch, one row per rank (``v`` blocks share a row when v > 1)."""
    from chunkflow_pl.schedule.timeline import draw_timeline

    axis = max(cf.step_time, base.step_time)  # one time scale for all pictures
    name = "chunkflow" + (f"_v{v}" if v > 1 else "") + ("_split" if split else "")
    drawn = [(name, cf)] + ([("1f1b", base)] if with_base else [])
    for name, r in drawn:
        path = Path(directory) / f"{model}_{ctx // 1024}k_pp{pp}_{name}.png"
        title = (f"{name}: Qwen2.5-{model.upper()}, {ctx // 1024}K context, pp={pp}: step {r.step_time:.2f} s, "
                 f"bubble {r.bubble_total:.1%}")
        draw_timeline(r.events, path, pp, title=title, labels=False, time_axis=axis)
        print(f"timeline: {path}")


if __name__ == "__main__":
    main()
