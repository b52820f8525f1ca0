"""Same command, same data, same machine: bit-identical gradients in every fresh process (issue 7.1).

The case is the one the defect was reported on (hidden 96, 3 layers, 6 query / 2 key-value heads,
vocabulary 503, tied embeddings; sequences of 33, 2, 256 and 19 tokens), run once whole (chunk.size
256) and once split (chunk.size 64: the 256-token sequence becomes a chain of 4 dependent chunks, so
state passing and the prefix merge run too). ``CHUNKFLOW_DETERMINISM_RUNS`` sets the process count
(default 6; ``benchmarks/determinism.py`` runs 20).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from chunkflow_pl.model.rope import RotaryTable

WORKER = Path(__file__).with_name("determinism_worker.py")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=503, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    g = torch.Generator().manual_seed(1)
    with open(d / "data.jsonl", "w") as f:
        for n in (33, 2, 256, 19):
            f.write(json.dumps({"input_ids": torch.randint(0, 503, (n,), generator=g).tolist()}) + "\n")
    return d


def run_workers(case_dir: Path, chunk_size: int, runs: int) -> list[tuple[str, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def one(i: int) -> tuple[str, str]:
        out = subprocess.run([sys.executable, str(WORKER), str(case_dir), str(chunk_size), str(1000 + i)],
                             capture_output=True, text=True, timeout=180, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        digest, same = out.stdout.split()
        return digest, same

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(one, range(runs)))


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [64])
def test_fresh_processes_give_bit_identical_gradients(case_dir, chunk_size):
    runs = int(os.environ.get("CHUNKFLOW_DETERMINISM_RUNS", "6"))
    results = run_workers(case_dir, chunk_size, runs)
    assert all(same == "True" for _, same in results), f"a process's first step differed from its second: {results}"
    digests = {d for d, _ in results}
    assert len(digests) == 1, f"{len(digests)} different gradients in {runs} fresh processes: {results}"


def test_rope_table_is_float64_cos_of_transformers_angles():
    """cos/sin are exact float64 functions of transformers' float32 angles, at any position.

    Before the fix cos/sin were computed in float32 (1e-7 relative error, and MKL-dependent rounding);
    a table that is not exact to float64 rounding fails here."""
    head_dim, theta = 16, 10000.0
    table = RotaryTable(head_dim, theta)
    pos = torch.tensor([0, 1, 2, 255, 4095, 4096, 70000, 262143])
    cos_TD, sin_TD = table.cos_sin(pos, int(pos.max()) + 1, torch.float64)
    inv = (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))).numpy()
    for t, p in enumerate(pos.tolist()):
        ang = (np.float32(p) * inv).astype(np.float64)  # transformers' float32 angle, exactly
        want_cos = np.array([np.cos(a) for a in ang] * 2)
        want_sin = np.array([np.sin(a) for a in ang] * 2)
        np.testing.assert_allclose(cos_TD[t].numpy(), want_cos, rtol=0, atol=4e-16)
        np.testing.assert_allclose(sin_TD[t].numpy(), want_sin, rtol=0, atol=4e-16)
    assert table.num_positions >= 262144


def test_rope_gather_does_not_depend_on_what_else_is_in_the_chunk():
    """The same position gets the same bits whatever chunk, batch or table size it comes with."""
    table = RotaryTable(32, 1e6)
    a, _ = table.cos_sin(torch.tensor([5, 77, 1000]), 1001, torch.float32)
    b, _ = table.cos_sin(torch.arange(100000), 100000, torch.float32)  # grows the table
    assert torch.equal(a, b[[5, 77, 1000]])


def test_mkl_runs_in_strict_reproducible_mode():
    """chunkflow_pl asks MKL for strict CNR at import; a fresh interpreter confirms MKL took it."""
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build does not use MKL")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    env["PYTHONPATH"] = str(ROOT)
    code = ("import chunkflow_pl\nfrom chunkflow_pl.utils.reproducibility import mkl_cnr_mode\n"
            "print(mkl_cnr_mode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.strip() == "AUTO,STRICT", out.stdout + out.stderr
