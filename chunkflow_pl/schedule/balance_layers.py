"""Head-aware layer cut: layers per pipeline block so each block's forward FLOPs are as even as whole layers allow.

``even_stage_layers`` (``cost.py``) gives every block the same number of decoder layers, so the last block,
which also runs the LM head (``2 V D`` FLOPs per token, ``model/flops.py``), is the slowest and sets the
pace of the whole pipeline: at Qwen2.5-7B (28 layers, V = 152K) with 8 blocks of 3-4 layers the head alone
is worth about 1.4 layers of an 8K chunk, so the last block does 1.34-1.78x the work of the others
(``benchmarks/README.md``). The embedding is a table lookup: memory, no FLOPs, so block 0 needs no
correction.

``balance_layers(cfg, blocks, tokens, prefix)`` prices one representative chunk of ``tokens`` new tokens
after ``prefix`` tokens of its sequence (attention pairs ``tokens * prefix + tokens (tokens + 1) / 2``): a
layer costs ``L = linear * tokens + attention * pairs``, the head ``H = head * tokens``. It tries every
layer count ``n`` of the last block and cuts the rest evenly (``even_stage_layers``, the first blocks take
the extra ones), and returns the cut with the smallest maximum block cost ``max(n L + H, ceil((N - n) /
(blocks - 1)) L)``; among equal maxima the one whose last block is closest to the even cut (fewest layers
moved). Backward, recompute and the split halves scale the same way for layers and head (all matrix
products, ``cost.py``), so the forward balance is the step's. Short chunks weigh the head most: the cut
for the benchmark's chunk size is a compromise for chunks that are mostly shorter or longer.

Pure and deterministic (every rank must cut the same way). With virtual stages block ``b`` runs on rank
``b % pp``; even blocks make even ranks. Used by ``benchmarks/pipeline_bubbles.py --balance head``; the
runtime's stage split (``model/stages.py``) does not call it yet.
"""

from __future__ import annotations

import math

from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.flops import ModelFlops
from chunkflow_pl.schedule.cost import even_stage_layers


def balance_layers(cfg: ModelConfig, blocks: int, tokens: int, prefix: int = 0) -> tuple[int, ...]:
    """Layers per block (summing to ``cfg.num_layers``, each >= 1) evening out forward FLOPs with the head."""
    n_layers = cfg.num_layers
    if not 1 <= blocks <= n_layers:
        raise ValueError(f"blocks={blocks} must be between 1 and the number of layers ({n_layers})")
    if tokens < 1 or prefix < 0:
        raise ValueError(f"tokens={tokens} must be >= 1 and prefix={prefix} >= 0")
    if blocks == 1:
        return (n_layers,)
    f = ModelFlops.from_config(cfg, layers=1, head=True)
    pairs = tokens * prefix + tokens * (tokens + 1) // 2
    layer = f.linear_per_layer_token * tokens + f.attn_per_layer_pair * pairs
    head = f.head_per_token * tokens
    even_last = even_stage_layers(n_layers, blocks)[-1]
    best: tuple[float, int, int] | None = None  # (max block cost, layers moved off the even cut, last's layers)
    for last in range(1, n_layers - blocks + 2):
        rest = n_layers - last
        worst = max(last * layer + head, math.ceil(rest / (blocks - 1)) * layer)
        key = (worst, abs(last - even_last), last)
        if best is None or key < best:
            best = key
    last = best[2]
    return even_stage_layers(n_layers - last, blocks - 1) + (last,)
