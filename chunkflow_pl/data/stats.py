"""``python -m chunkflow_pl.data.stats [overrides]``: how a data config chunks, before training.

Overrides use the training command's keys (Hydra style, ``key=value``)::

    python -m chunkflow_pl.data.stats data.num_sequences=100000 data.global_batch_size=256 \\
        chunk.size=8k data.max_len=256k parallel.dp=4
    python -m chunkflow_pl.data.stats data=chat data.path=chats.jsonl data.tokenizer=/ckpt/qwen

``data=<name>`` picks ``conf/data/<name>.yaml`` (default: synthetic); ``data.<field>`` sets a
``DataConfig`` field; ``chunk.size`` (default 8k), ``parallel.dp`` (default 1),
``stats.max_batches`` (default: all global batches of one epoch). Synthetic data needs lengths only
(100k sequences take seconds); record files are tokenised into the usual cache first.

Prints the length histogram (the paper's Table 1 buckets), chunks per global batch against the
lower bound ``ceil(tokens / chunk.size)``, packing efficiency, dependent-chunk chain lengths and
data-parallel imbalance, then one JSON line with the numbers.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.dataset import epoch_permutation
from chunkflow_pl.data.stats_core import format_table, summarize_global_batches
from chunkflow_pl.utils.sizes import parse_size

CONF_DATA_DIR = Path(__file__).resolve().parents[2] / "conf" / "data"
OTHER_KEYS = {"chunk.size": "8k", "parallel.dp": 1, "stats.max_batches": None, "model.vocab_size": None}


def parse_overrides(argv: Sequence[str]) -> tuple[DataConfig, dict[str, Any]]:
    """``key=value`` args -> (DataConfig, other settings). Values are parsed as YAML scalars."""
    group = "synthetic"
    data: dict[str, Any] = {}
    other: dict[str, Any] = dict(OTHER_KEYS)
    pairs: list[tuple[str, Any]] = []
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"expected key=value, got {arg!r} (e.g. data.num_sequences=100000 chunk.size=8k)")
        key, raw = arg.split("=", 1)
        key = key.lstrip("+")
        value = yaml.safe_load(raw) if raw != "" else None
        if key == "data":
            group = str(value)
        else:
            pairs.append((key, value))
    base = CONF_DATA_DIR / f"{group}.yaml"
    if base.is_file():
        data.update(yaml.safe_load(base.read_text()) or {})
    elif group != "synthetic":
        raise SystemExit(f"data={group}: no {base}")
    for key, value in pairs:
        if key.startswith("data."):
            data[key[len("data.") :]] = value
        elif key in other:
            other[key] = value
        else:
            raise SystemExit(f"unknown key {key}; accepted: data=<name>, data.<field>, {', '.join(OTHER_KEYS)}")
    cfg = DataConfig.from_dict(data)
    other["chunk.size"] = parse_size(other["chunk.size"], key="chunk.size")
    other["parallel.dp"] = int(other["parallel.dp"])
    return cfg, other


def sequence_lengths(cfg: DataConfig, vocab_size: int | None) -> np.ndarray:
    if cfg.kind == "synthetic":
        from chunkflow_pl.data.sources.synthetic import synthetic_lengths

        return synthetic_lengths(cfg.num_sequences, int(cfg.max_len), int(cfg.min_len), cfg.seed)
    from chunkflow_pl.data.datamodule import make_store

    return make_store(cfg, vocab_size).lengths


def global_batches(lengths: np.ndarray, cfg: DataConfig, max_batches: int | None) -> list[list[int]]:
    """Lengths of every global batch of epoch 0, in the order training would see them."""
    perm = epoch_permutation(len(lengths), 0, cfg.shuffle, cfg.seed)
    g = cfg.global_batch_size
    n = math.ceil(len(lengths) / g)
    if max_batches is not None:
        n = min(n, int(max_batches))
    return [lengths[perm[i * g : (i + 1) * g]].tolist() for i in range(n)]


def compute_stats(
    cfg: DataConfig, chunk_size: int, dp: int, max_batches: int | None = None, vocab_size: int | None = None
) -> dict[str, Any]:
    lengths = sequence_lengths(cfg, vocab_size)
    summary = summarize_global_batches(global_batches(lengths, cfg, max_batches), chunk_size, dp)
    cpb = np.asarray(summary["chunks_per_batch"], dtype=np.float64)
    hist = summary["length_histogram"]
    total = max(sum(hist.values()), 1)
    return {
        "kind": cfg.kind,
        "num_sequences": int(len(lengths)),
        "total_tokens": int(lengths.sum()),
        "max_len": int(lengths.max()),
        "global_batch_size": cfg.global_batch_size,
        "chunk_size": chunk_size,
        "dp": dp,
        "num_batches": summary["num_batches"],
        "length_histogram": hist,
        "length_histogram_pct": {k: 100.0 * v / total for k, v in hist.items()},
        "chunks_per_batch_mean": float(cpb.mean()),
        "chunks_per_batch_p99": float(np.percentile(cpb, 99)),
        "chunks_per_batch_max": int(cpb.max()),
        "lower_bound_mean": float(np.mean(summary["lower_bound_per_batch"])),
        "frac_within_lower_bound_plus_1": summary["frac_within_lower_bound_plus_1"],
        "mean_packing_efficiency": summary["mean_packing_efficiency"],
        "chain_length_histogram": {str(k): v for k, v in summary["chain_length_histogram"].items()},
        "micro_steps_per_batch_max": max(summary["micro_steps_per_batch"]),
        "dp_imbalance_mean": summary["dp_imbalance_mean"],
        "dp_imbalance_max": summary["dp_imbalance_max"],
    }


def render(stats: dict[str, Any]) -> str:
    lines = ["sequence lengths (K = 1024 tokens)"]
    for k, v in stats["length_histogram"].items():
        lines.append(f"  {k:<10}{v:>10}  {stats['length_histogram_pct'][k]:7.3f}%")
    rows = {k: v for k, v in stats.items() if k not in ("length_histogram", "length_histogram_pct")}
    lines.append("")
    lines.append(format_table(rows))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg, other = parse_overrides(sys.argv[1:] if argv is None else argv)
    vocab = other["model.vocab_size"]
    stats = compute_stats(
        cfg,
        other["chunk.size"],
        other["parallel.dp"],
        other["stats.max_batches"],
        int(vocab) if vocab is not None else None,
    )
    print(render(stats))
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
