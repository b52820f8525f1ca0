"""``python -m chunkflow_pl.data.stats [overrides]``: how a data config chunks, before training.

Takes the training command's overrides, composed with Hydra from ``conf/`` exactly as ``train.py`` does::

    python -m chunkflow_pl.data.stats data.num_sequences=100000 data.global_batch_size=256 \\
        chunk.size=8k data.max_len=256k parallel.dp=4
    python -m chunkflow_pl.data.stats data=chat data.path=chats.jsonl data.tokenizer=/ckpt/qwen

Uses ``data``, ``chunk.size`` and ``parallel.dp`` (and the model's vocabulary for synthetic token ids);
``stats.max_batches=N`` (this command's own key) stops after N global batches (default: all of epoch 0).
Synthetic data needs lengths only (100k sequences take seconds); record files are tokenised into the
usual cache first.

Prints the length histogram (the paper's Table 1 buckets), chunks per global batch against the
lower bound ``ceil(tokens / chunk.size)``, packing efficiency, dependent-chunk chain lengths and
data-parallel imbalance, then one JSON line with the numbers.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.dataset import epoch_permutation
from chunkflow_pl.data.stats_core import format_table, summarize_global_batches

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OWN_KEYS = ("stats.max_batches",)


@dataclass(frozen=True)
class StatsSettings:
    """What this command reads from the composed training config, plus its own ``stats.*`` keys."""

    data: DataConfig
    chunk_size: int
    dp: int
    vocab_size: int
    max_batches: int | None = None


def load_settings(argv: Sequence[str]) -> StatsSettings:
    """Compose ``conf/train.yaml`` with ``argv`` (Hydra overrides; unknown keys fail as in ``train.py``)."""
    from hydra import compose, initialize_config_dir

    from chunkflow_pl.config import ChunkConfig, ParallelConfig
    from chunkflow_pl.model.config import ModelSettings

    own: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("stats."):
            if key not in OWN_KEYS or "=" not in arg:
                raise ValueError(f"unknown key {key}; this command's own keys: {', '.join(OWN_KEYS)}=N "
                                 f"(every other key is the training config's)")
            own[key] = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    raw = own.get("stats.max_batches")
    if raw is not None and not raw.strip().isdigit():
        raise ValueError(f"stats.max_batches={raw!r} must be a positive integer")
    return StatsSettings(data=DataConfig.from_dict(cfg.data), chunk_size=ChunkConfig.from_dict(cfg.chunk).size,
                         dp=ParallelConfig.from_dict(cfg.parallel).data_parallel,
                         vocab_size=ModelSettings.from_dict(cfg.model).architecture().vocab_size,
                         max_batches=int(raw) if raw is not None else None)


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
    st = load_settings(sys.argv[1:] if argv is None else argv)
    # Record files: lengths only, so no vocabulary check here (training checks ids against the model's).
    vocab = st.vocab_size if st.data.kind == "synthetic" else None
    stats = compute_stats(st.data, st.chunk_size, st.dp, st.max_batches, vocab)
    print(render(stats))
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    from hydra.errors import HydraException

    try:
        main()
    except (ValueError, HydraException) as e:
        sys.exit(f"error: {e}")
