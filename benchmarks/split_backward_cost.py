"""What split backward costs on this machine: one chunk's ordinary backward vs its B (input gradients, weight
gradients stashed) plus its W (``dy^T @ x`` per linear layer, ``model/split_linear.py``).

One process, one thread, fp32, a 4-layer model (hidden 512, MLP 1536, 8 heads / 2 kv heads, vocab 1000), one
chunk of ``--tokens`` tokens; medians of ``--repeats`` runs after one warm-up. Rows: the plain decoder
(``nn.Linear``), the same weights with ``SplitLinear`` backward unsplit, and split (B, then W)::

    PYTHONPATH=. python benchmarks/split_backward_cost.py [--tokens 1024] [--repeats 6]

Measured 2026-12-04 on the 2-core CPU machine shared with other jobs (load ~4, so +-10%): nn.Linear 1205 ms;
SplitLinear unsplit 1149 ms; split B 721 ms + W 342 ms = 1064 ms. B + W cost one ordinary backward (no product
is computed twice), and B, the part on the pipeline's critical path, is ~0.6 of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.split_linear import WeightGradStash, apply_split_linear, capture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                      num_kv_heads=2)
    plain = Qwen2Decoder(cfg)
    plain.reset_parameters()
    split = Qwen2Decoder(cfg)
    split.load_state_dict(plain.state_dict())
    apply_split_linear(split)
    ids = torch.randint(0, cfg.vocab_size, (a.tokens,))
    pos, meta = torch.arange(a.tokens), VarlenMeta.from_lengths([a.tokens])

    def once(model, split_it: bool) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        hidden, _ = model(ids, pos, meta)
        loss = model.loss_sum(hidden, ids)
        t0 = time.perf_counter()
        if not split_it:
            loss.backward()
            return time.perf_counter() - t0, 0.0
        stash = WeightGradStash()
        with capture(stash):
            loss.backward()
        t1 = time.perf_counter()
        stash.flush()
        return t1 - t0, time.perf_counter() - t1

    print(f"{'':24s}{'B ms':>9s}{'W ms':>9s}{'B+W ms':>9s}")
    for name, model, split_it in (("nn.Linear", plain, False), ("SplitLinear, unsplit", split, False),
                                  ("SplitLinear, B then W", split, True)):
        runs = [once(model, split_it) for _ in range(a.repeats + 1)][1:]
        b, w = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name:24s}{b * 1e3:9.1f}{w * 1e3:9.1f}{(b + w) * 1e3:9.1f}")


if __name__ == "__main__":
    main()
