"""Bit-identical gradients across fresh processes (issue 7, item 1): N processes, one digest.

    python benchmarks/determinism.py --runs 20

Builds the reported case (tiny random Qwen2: hidden 96, 3 layers, 6/2 heads, vocab 503, tied; sequences of
33, 2, 256, 19 tokens), then for each chunk size runs ``tests/determinism_worker.py`` in ``--runs`` fresh
processes (2 at a time), each with a different heap history, and counts distinct gradient digests. Prints a
table and one JSON line; exits 1 if any chunk size gave more than one digest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "determinism_worker.py"


def make_case(d: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=503, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    with open(d / "data.jsonl", "w") as f:
        for n in (33, 2, 256, 19):
            f.write(json.dumps({"input_ids": torch.randint(0, 503, (n,), generator=g).tolist()}) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--chunk-sizes", default="256,64")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_case(d)
        for cs in (int(x) for x in args.chunk_sizes.split(",")):
            def one(i: int, cs: int = cs) -> tuple[str, bool]:
                out = subprocess.run([sys.executable, str(WORKER), str(d), str(cs), str(1000 + i)],
                                     capture_output=True, text=True, timeout=300, env=env, check=True)
                digest, same = out.stdout.split()
                return digest, same == "True"

            with ThreadPoolExecutor(max_workers=2) as pool:
                res = list(pool.map(one, range(args.runs)))
            rows.append({"chunk_size": cs, "runs": args.runs, "distinct_digests": len({r[0] for r in res}),
                         "second_step_differs": sum(not r[1] for r in res)})
    print(f"{'chunk.size':>10} {'runs':>5} {'distinct gradients':>19} {'2nd step differs':>17}")
    for r in rows:
        print(f"{r['chunk_size']:>10} {r['runs']:>5} {r['distinct_digests']:>19} {r['second_step_differs']:>17}")
    print(json.dumps({"benchmark": "determinism", "rows": rows}))
    return 0 if all(r["distinct_digests"] == 1 and r["second_step_differs"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
