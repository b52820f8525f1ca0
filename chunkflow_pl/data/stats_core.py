"""Pure statistics over sequence lengths: length buckets, chunking quality, data-parallel balance.

Used by the stats command to check, on real length distributions, the paper's claims: most global
batches need at most ``ceil(tokens / chunk_size) + 1`` chunks, packing wastes little, and LPT keeps
ranks balanced. Example output of ``format_table(summarize_global_batches(...))``::

    num_batches                       100
    chunk_size                        4096
    chunks_per_batch                  min 20  mean 23.4  max 31
    frac_within_lower_bound_plus_1    0.99
    chain_length_histogram            2: 7  3: 2  12: 1
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan, packing_efficiency

K = 1024
# (label, upper bound exclusive); the last bucket is open-ended
LENGTH_BUCKETS: tuple[tuple[str, float], ...] = (
    ("<1K", 1 * K),
    ("1K-4K", 4 * K),
    ("4K-32K", 32 * K),
    ("32K-128K", 128 * K),
    (">128K", math.inf),
)


def length_histogram(lengths: Sequence[int]) -> dict[str, int]:
    """Counts per bucket; all five keys always present, in order (K = 1024, lower bound inclusive)."""
    hist = {label: 0 for label, _ in LENGTH_BUCKETS}
    for n in lengths:
        if n < 0:
            raise ValueError(f"negative length {n}")
        for label, upper in LENGTH_BUCKETS:
            if n < upper:
                hist[label] += 1
                break
    return hist


def summarize_global_batches(batches: Sequence[Sequence[int]], chunk_size: int, dp: int) -> dict[str, Any]:
    """Chunk and balance every global batch (lists of lengths) and aggregate.

    Keys: ``num_batches``, ``chunk_size``, ``dp``, ``chunks_per_batch`` and ``lower_bound_per_batch``
    (lists, lower bound = ceil(tokens / chunk_size)), ``frac_within_lower_bound_plus_1``,
    ``mean_packing_efficiency``, ``chain_length_histogram`` ({chunks in a chain: count}),
    ``micro_steps_per_batch`` (list), ``dp_imbalance_mean``, ``dp_imbalance_max``,
    ``length_histogram`` (over all sequences).
    """
    chunks_per_batch: list[int] = []
    lower_bounds: list[int] = []
    efficiencies: list[float] = []
    imbalances: list[float] = []
    micro_steps: list[int] = []
    chain_hist: dict[int, int] = {}
    all_lengths: list[int] = []
    for lengths in batches:
        plan = build_chunk_plan(lengths, chunk_size)
        chunks_per_batch.append(len(plan.chunks))
        lower_bounds.append(math.ceil(sum(lengths) / chunk_size))
        efficiencies.append(packing_efficiency(plan, chunk_size))
        for chain in plan.chains.values():
            chain_hist[len(chain)] = chain_hist.get(len(chain), 0) + 1
        assignment = assign_to_ranks(plan, dp)
        imbalances.append(assignment.imbalance)
        micro_steps.append(assignment.num_micro_steps)
        all_lengths.extend(lengths)
    n = len(chunks_per_batch)
    within = sum(c <= lb + 1 for c, lb in zip(chunks_per_batch, lower_bounds, strict=True))
    return {
        "num_batches": n,
        "chunk_size": chunk_size,
        "dp": dp,
        "chunks_per_batch": chunks_per_batch,
        "lower_bound_per_batch": lower_bounds,
        "frac_within_lower_bound_plus_1": within / n if n else 1.0,
        "mean_packing_efficiency": sum(efficiencies) / n if n else 1.0,
        "chain_length_histogram": dict(sorted(chain_hist.items())),
        "micro_steps_per_batch": micro_steps,
        "dp_imbalance_mean": sum(imbalances) / n if n else 1.0,
        "dp_imbalance_max": max(imbalances, default=1.0),
        "length_histogram": length_histogram(all_lengths),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "  ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            return "-"
        return f"min {_fmt(min(value))}  mean {sum(value) / len(value):.4g}  max {_fmt(max(value))}"
    return str(value)


def format_table(summary: Mapping[str, Any]) -> str:
    """Two-column text table: scalars as is, lists as min/mean/max, dicts inline as ``k: v``."""
    width = max((len(k) for k in summary), default=0) + 2
    return "\n".join(f"{k:<{width}}{_fmt(v)}" for k, v in summary.items())
