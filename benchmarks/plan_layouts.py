"""README's layout table: ``python -m chunkflow_pl.plan``'s pick for Qwen2.5 7B..72B x 8/16/64 cards of 80 GB x
longest sequence 32K/256K/1M (synthetic LMSys-like data, global batches of 256 sequences, bf16-mixed, AdamW).

``python benchmarks/plan_layouts.py`` (pure planning, no device) prints a markdown table, then one JSON line.
Every cell is the planner's own CLI (``chunkflow_pl.plan.__main__.main``) with the overrides listed in
``COMMON``; the candidates are narrowed (chunk 8k/16k/32k, k 1/2, one simulated batch) to keep it to minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chunkflow_pl.plan.__main__ import main  # noqa: E402

MODELS = ("qwen7b", "qwen14b", "qwen32b", "qwen72b")
CARDS = (8, 16, 64)
LENGTHS = ("32k", "256k", "1m")
COMMON = ["trainer.precision=bf16-mixed", "plan.device_memory=80GB", "plan.overhead=2GiB", "plan.flops_per_s=4e14",
          "data.global_batch_size=256", "plan.num_batches=1", "chunk.size=auto", "chunk.k=auto",
          "plan.chunk_sizes=[8k,16k,32k]", "plan.ks=[1,2]"]


def cell(model: str, cards: int, length: str) -> dict:
    overrides = [f"model={model}", f"plan.devices={cards}", f"data.max_len={length}", *COMMON]
    if length != "32k":  # the presets' own position limit is 32K/128K: planning only, no weights are read
        overrides.append(f"model.overrides.max_position_embeddings={length}")
    with contextlib.redirect_stdout(io.StringIO()):
        result = main(overrides)
    b = result.best
    return {"model": model, "cards": cards, "max_len": length, "fits": b is not None,
            "layout": None if b is None else b.layout.override(), "peak_gib": None if b is None else b.peak / 2**30,
            "step_s": None if b is None else b.step_time, "bubble": None if b is None else b.bubble}


def row(c: dict) -> str:
    if not c["fits"]:
        return f"| {c['model']} | {c['cards']} | {c['max_len']} | no | - | - | - | - |"
    lay = dict(kv.split("=") for kv in c["layout"].split())
    layout = (f"pp {lay['parallel.pp']} x repl {lay['parallel.dp_replicate']} x shard {lay['parallel.dp_shard']}, "
              f"{lay['parallel.grad_reduce']}, ckpt {lay['chunk.layer_checkpoint']}")
    chunk = f"{int(lay['chunk.size']) // 1024}k, k={lay['chunk.k']}"
    return (f"| {c['model']} | {c['cards']} | {c['max_len']} | yes | {layout} | {chunk} | {c['peak_gib']:.1f} | "
            f"{c['step_s']:.3g} s, bubble {c['bubble']:.0%} |")


if __name__ == "__main__":
    cells = []
    print("| model | cards | longest | fits | layout | chunk | peak GiB/rank | step (simulated) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for cards in CARDS:
            for length in LENGTHS:
                cells.append(cell(model, cards, length))
                print(row(cells[-1]), flush=True)
    print(json.dumps({"benchmark": "plan_layouts", "cells": [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in c.items()} for c in cells]}))
