"""Printing a layout search (``layout.py``): the fastest fitting layouts, the pick and its override line, JSON."""

from __future__ import annotations

from chunkflow_pl.plan.core import PlanSpec
from chunkflow_pl.plan.layout import LayoutResult, LayoutRow
from chunkflow_pl.utils.sizes import format_bytes

SHOWN = 12  # fastest fitting rows printed


def _size(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def row_line(r: LayoutRow, best: bool = False) -> str:
    lay = r.layout
    return (f"{lay.pp:>3} {lay.dp_replicate:>5} {lay.dp_shard:>5} {lay.grad_reduce:>14} {lay.layer_checkpoint:>5} "
            f"{_size(lay.chunk_size):>6} {lay.k:>3} {r.peak / 2**30:>9.2f} {r.step_time:>9.4g} {r.comm_time:>8.3g} "
            f"{r.bubble:>7.0%}{'  <- picked' if best else ''}")


def format_layouts(result: LayoutResult, shown: int = SHOWN) -> str:
    head = (f"{'pp':>3} {'repl':>5} {'shard':>5} {'grad_reduce':>14} {'ckpt':>5} {'chunk':>6} {'k':>3} "
            f"{'peak GiB':>9} {'step s':>9} {'comm s':>8} {'bubble':>7}")
    fitting = sorted((r for r in result.rows if r.fits), key=lambda r: r.step_time)
    lines = [head, "-" * len(head)] + [row_line(r, r is result.best) for r in fitting[:shown]]
    if len(fitting) > shown:
        lines.append(f"... {len(fitting) - shown} more fitting layouts")
    lines.append(f"{len(fitting)} of {len(result.rows)} candidates fit")
    return "\n".join(lines)


def layout_report(result: LayoutResult, spec: PlanSpec) -> str:
    c = result.cluster
    lines = [f"{c.devices} cards of {format_bytes(c.device_memory)} ({c.links.devices_per_node} per node, "
             f"{c.links.intra_node_gbps:g} Gb/s inside a node, {c.links.inter_node_gbps:g} Gb/s between nodes), "
             f"runtime overhead {format_bytes(spec.overhead)} per card, {spec.precision}, {spec.optimizer}, "
             f"{spec.flops_per_s:.3g} FLOP/s; longest sequence {result.max_len}", "", format_layouts(result), ""]
    if result.best is None:
        lines.append("no layout fits: more cards, chunk.size=auto (smaller chunks), chunk.offload_state=true, "
                     "trainer.precision=bf16-mixed, or a smaller model")
    else:
        b = result.best
        lines.append(f"picked: predicted peak {format_bytes(b.peak)} per rank, step {b.step_time:.4g} s "
                     f"(FSDP2 collectives {b.comm_time:.3g} s), bubble {b.bubble:.0%}")
        lines.append(f"override: {result.override()}")
    return "\n".join(lines)


def layout_json(result: LayoutResult) -> dict:
    b = result.best
    return {"benchmark": "plan_layout", "devices": result.cluster.devices,
            "device_memory": result.cluster.device_memory, "max_len": result.max_len,
            "candidates": len(result.rows), "fitting": sum(r.fits for r in result.rows),
            "picked": None if b is None else {**b.layout.__dict__, "peak_bytes": b.peak, "step_time": b.step_time,
                                              "comm_time": b.comm_time, "bubble": b.bubble},
            "override": result.override()}
