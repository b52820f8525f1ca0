"""Speed of the data planning steps (CPU, pure python / numpy): the timings the unit tests used to assert.

Each case runs ``--repeats`` times; the table shows the median and the worst time against its target,
then one ``RESULT {json}`` line. Targets are what keeps planning invisible next to a training step on a
laptop; a loaded machine may miss them without anything being wrong, so nothing here fails a test run.

    case                 what                                                        target
    build_chunk_plan     Alg. 1 on an LMSys-like global batch of 256 + one 200K seq    10 ms
    assign_to_ranks      DP balance of that plan over 8 ranks (C = 2K)               100 ms
    synthetic_lengths    100K long-tail lengths up to 256K                            1 s
    stats_100k           python -m chunkflow_pl.data.stats, 100K seqs, C = 8K        20 s

    python benchmarks/data_speed.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from chunkflow_pl.data import stats
from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.sources.synthetic import synthetic_lengths


def lmsys_like(rng: np.random.Generator, n: int) -> list[int]:
    x = np.exp(rng.normal(np.log(300), 1.3, size=n)).astype(int) + 1
    return np.minimum(x, 300_000).tolist()


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    batch = lmsys_like(rng, 256)
    batch[0] = 200_000
    plan = build_chunk_plan(batch, 2048)

    def quiet_stats() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            stats.main(["data.num_sequences=100000", "data.global_batch_size=256", "chunk.size=8k"])

    cases = {
        "build_chunk_plan": (lambda: build_chunk_plan(batch, 4096), args.repeats, 0.010),
        "assign_to_ranks": (lambda: assign_to_ranks(plan, 8), args.repeats, 0.100),
        "synthetic_lengths": (lambda: synthetic_lengths(100_000, 256 * 1024, 2, seed=7), 5, 1.0),
        "stats_100k": (quiet_stats, 2, 20.0),
    }
    result = {}
    print(f"{'case':<20}{'median s':>12}{'max s':>12}{'target s':>10}  ok")
    for name, (fn, repeats, target) in cases.items():
        times = timed(fn, repeats)
        med, worst = statistics.median(times), max(times)
        result[name] = {"median_s": med, "max_s": worst, "target_s": target, "repeats": repeats}
        print(f"{name:<20}{med:>12.4f}{worst:>12.4f}{target:>10.3f}  {'yes' if med <= target else 'NO'}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
