"""``python -m chunkflow_pl.plan [overrides]``: predicted memory and step time per (chunk.size, chunk.k).

Takes the training command's overrides (composed with Hydra from ``conf/``, ``plan.*`` included)::

    python -m chunkflow_pl.plan model=qwen7b data.max_len=256k plan.memory_budget=75GiB trainer.precision=bf16-mixed
    python -m chunkflow_pl.plan model=qwen7b parallel.pp=4 plan.memory_budget=75GiB plan.chunk_sizes=[8k,16k,32k]
    python -m chunkflow_pl.plan data=jsonl data.path=train.jsonl
    python -m chunkflow_pl.plan model=qwen72b plan.devices=64 plan.device_memory=80GB trainer.precision=bf16-mixed

With ``plan.devices`` (or ``parallel=auto`` under torchrun/srun) it searches the layout instead: pp x dp_replicate
x dp_shard, grad_reduce, layer checkpointing, split backward and virtual stages (and chunk.size / chunk.k when they
are ``auto`` or ``plan.chunk_sizes`` is given), printing the fastest fitting layouts and the override line of the pick.
Without it, a pipeline's table also tries ``parallel.split_backward`` and ``parallel.virtual_stages=2`` where the
run accepts them (``runnable.py``).

Prints the data's length histogram, a table (chunks per batch, recompute share of compute, predicted
step time and tokens/s, predicted peak memory, per stage when ``parallel.pp > 1``), the recommended
setting, the override line that selects it, and one JSON line. See ``core.py`` for how each number is
predicted and what is not modelled.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from chunkflow_pl.plan.core import PlanResult, format_table, plan_chunking
from chunkflow_pl.plan.layout import LayoutResult, plan_layout
from chunkflow_pl.plan.layout_report import layout_json, layout_report
from chunkflow_pl.plan.settings import plan_inputs
from chunkflow_pl.utils.sizes import format_bytes

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
BUCKETS = ((1024, "<1K"), (4096, "1K-4K"), (32768, "4K-32K"), (131072, "32K-128K"), (None, ">128K"))


def histogram(batches: Sequence[Sequence[int]]) -> dict[str, int]:
    out = {name: 0 for _, name in BUCKETS}
    for lens in batches:
        for n in lens:
            out[next(name for top, name in BUCKETS if top is None or n < top)] += 1
    return out


def report(result: PlanResult, hist: dict[str, int]) -> str:
    spec = result.spec
    total = max(sum(hist.values()), 1)
    lines = ["sequence lengths: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in hist.items())
             + f"; longest {result.max_len}",
             f"budget {format_bytes(spec.memory_budget)} per device (runtime overhead "
             f"{format_bytes(spec.overhead)} counted against it), {spec.precision}, {spec.optimizer}, "
             f"pp={spec.pp} dp={spec.dp}; step time: cost model at {spec.flops_per_s:.3g} FLOP/s over "
             f"{result.sampled_batches} global batches", "", format_table(result), ""]
    if result.best is None:
        lines.append("nothing fits the budget: use parallel.pp > 1, chunk.offload_state=true, a smaller model or "
                     "trainer.precision=bf16-true, or raise plan.memory_budget")
    else:
        b = result.best
        lines.append(f"recommended: chunk.size={b.chunk_size} chunk.k={b.k} (predicted peak {format_bytes(b.peak)}, "
                     f"step {b.step_time:.4g} s)")
        lines.append(f"override: {result.override()}")
    return "\n".join(lines)


def to_json(result: PlanResult, hist: dict[str, int]) -> dict:
    return {
        "benchmark": "plan", "max_len": result.max_len, "length_histogram": hist,
        "memory_budget": result.spec.memory_budget, "overhead": result.spec.overhead,
        "flops_per_s": result.spec.flops_per_s, "pp": result.spec.pp, "dp": result.spec.dp,
        "rows": [{"chunk_size": r.chunk_size, "k": r.k, "chunks_per_batch": r.chunks_per_batch,
                  "recompute_share": r.recompute_share, "step_time": r.step_time, "tokens_per_s": r.tokens_per_s,
                  "peak_bytes": r.peak, "stage_peak_bytes": list(r.stage_peaks), "fits": r.fits,
                  "split_backward": r.split_backward, "virtual_stages": r.virtual} for r in result.rows],
        "recommended": None if result.best is None else {
            "chunk_size": result.best.chunk_size, "k": result.best.k, "split_backward": result.best.split_backward,
            "virtual_stages": result.best.virtual},
        "override": result.override(),
    }


def nothing_fits(result: PlanResult | LayoutResult) -> str | None:
    """The error of a plan with no candidate under the budget (the CLI then exits 1), or None."""
    if result.best is not None:
        return None
    if isinstance(result, LayoutResult):
        return (f"no layout of plan.devices={result.cluster.devices} cards fits plan.device_memory="
                f"{format_bytes(result.cluster.device_memory)}; see the table and the advice printed above")
    return (f"no (chunk.size, chunk.k) candidate fits plan.memory_budget={format_bytes(result.spec.memory_budget)}; "
            f"see the table and the advice printed above")


def main(argv: Sequence[str] | None = None) -> PlanResult | LayoutResult:
    """The chunk-size table for the configured layout, or with ``plan.devices`` (or ``parallel=auto`` under a
    launcher) the layout search (``layout.py``)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(sys.argv[1:] if argv is None else argv))
    inputs = plan_inputs(cfg)
    if inputs.cluster is not None:
        layouts = plan_layout(inputs.model, inputs.spec, inputs.cluster, inputs.sample, inputs.epoch)
        print(layout_report(layouts, inputs.spec))
        print(json.dumps(layout_json(layouts)))
        return layouts
    result = plan_chunking(inputs.model, inputs.spec, inputs.sample, inputs.epoch)
    hist = histogram(inputs.epoch)
    print(report(result, hist))
    print(json.dumps(to_json(result, hist)))
    return result


if __name__ == "__main__":
    try:
        problem = nothing_fits(main())
    except (ValueError, FileNotFoundError, HydraException) as e:  # one line, as train.py prints its errors
        sys.exit("error: " + " ".join(str(e).split()))
    if problem:
        sys.exit(f"error: {problem}")
