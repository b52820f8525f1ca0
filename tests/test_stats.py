"""The stats command: LMSys-like synthetic data chunks near the lower bound, quickly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chunkflow_pl.data import stats

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_100k_long_tail_chunks_near_lower_bound(capsys):
    t = time.perf_counter()
    out = stats.main(["data.num_sequences=100000", "data.global_batch_size=256", "chunk.size=8k"])
    elapsed = time.perf_counter() - t
    assert elapsed < 20, f"stats on 100k synthetic sequences took {elapsed:.1f}s"
    assert out["num_sequences"] == 100_000 and out["num_batches"] == 391 and out["chunk_size"] == 8192
    hist = out["length_histogram"]
    assert sum(hist.values()) == 100_000
    assert (hist["<1K"] + hist["1K-4K"]) / 100_000 > 0.99  # >99% of sequences under 4K
    assert out["frac_within_lower_bound_plus_1"] >= 0.99  # chunks <= ceil(tokens / chunk) + 1
    assert 0.5 < out["mean_packing_efficiency"] <= 1.0

    printed = capsys.readouterr().out.strip().splitlines()
    assert "<1K" in printed[1] and "%" in printed[1]
    assert json.loads(printed[-1]) == json.loads(json.dumps(out))


def test_overrides_long_tail_and_dp():
    out = stats.main(
        [
            "data.num_sequences=20000",
            "data.global_batch_size=256",
            "data.max_len=256k",
            "chunk.size=8k",
            "parallel.dp=4",
            "stats.max_batches=40",
        ]
    )
    assert out["dp"] == 4 and out["num_batches"] == 40
    assert out["max_len"] > 32 * 1024
    assert out["chain_length_histogram"]  # long sequences become chains of dependent chunks
    assert out["dp_imbalance_mean"] >= 1.0


def test_bad_override_is_reported():
    with pytest.raises(SystemExit, match="unknown key chunk.k"):
        stats.main(["chunk.k=2"])
    with pytest.raises(ValueError, match=r"unknown key data\.max_length"):
        stats.main(["data.max_length=10"])


def test_records_source(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"input_ids": list(range(n))}) + "\n" for n in (5, 900, 3000, 40)))
    out = stats.main(
        [
            "data=jsonl",
            f"data.path={f}",
            f"data.cache_dir={tmp_path / 'c'}",
            "data.global_batch_size=2",
            "chunk.size=1k",
        ]
    )
    assert out["num_sequences"] == 4 and out["total_tokens"] == 3945 and out["num_batches"] == 2


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "chunkflow_pl.data.stats", "data.num_sequences=2000", "chunk.size=4k"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["num_sequences"] == 2000
