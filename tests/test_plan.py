"""Planner: the memory model against the real decoder, the CLI, and chunk.size=auto on a real run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig, get_preset
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.memory import activation_bytes_per_token_layer, stage_params
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.plan.__main__ import main as plan_main
from chunkflow_pl.utils.sizes import parse_bytes
from train import train


def saved_bytes_per_token(cfg: ModelConfig, tokens: int) -> float:
    """Bytes autograd keeps for backward after one forward of ``tokens`` tokens (parameters excluded)."""
    torch.manual_seed(0)
    model = Qwen2Decoder(cfg, loss_chunk=tokens // 2)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (tokens,))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, _ = model(ids, torch.arange(tokens), VarlenMeta.from_lengths([tokens]))
        model.loss_sum(hidden, ids)
    return sum(n for ptr, n in seen.items() if ptr not in params) / tokens


@pytest.mark.parametrize("cfg", [get_preset("tiny"), ModelConfig(vocab_size=64, hidden_size=96, intermediate_size=200,
                                                                 num_layers=3, num_heads=8, num_kv_heads=2)])
def test_activation_estimate_matches_what_autograd_saves(cfg):
    per_layer = saved_bytes_per_token(cfg, 512) - saved_bytes_per_token(
        ModelConfig(**{**cfg.as_dict(), "num_layers": cfg.num_layers - 1}), 512)
    assert activation_bytes_per_token_layer(cfg, "32-true") == pytest.approx(per_layer, rel=0.01)


@pytest.mark.parametrize("tie", [True, False])
def test_stage_parameter_counts_match_the_built_stages(tie):
    cfg = get_preset("tiny", num_layers=5, tie_word_embeddings=tie)
    for pp in (1, 2, 3):
        for spec in split_stages(cfg.num_layers, pp):
            built = sum(p.numel() for p in Qwen2Decoder(cfg, stage=spec).parameters())
            assert stage_params(cfg, spec) == built, (pp, spec)


def test_parse_bytes_units_and_errors():
    assert parse_bytes("75GiB") == parse_bytes("75G") == 75 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(4096) == 4096
    with pytest.raises(ValueError, match=r"plan\.memory_budget='75 gigs'.*75GiB"):
        parse_bytes("75 gigs", key="plan.memory_budget")


def test_cli_prints_a_table_a_recommendation_and_its_override(capsys):
    result = plan_main(["data.num_sequences=400", "data.max_len=8k", "plan.memory_budget=600MiB", "plan.overhead=0",
                        "plan.flops_per_s=1e11", "plan.chunk_sizes=[1k,2k,4k,8k]", "plan.ks=[1,2,chain]"])
    out = capsys.readouterr().out
    assert "recommended: chunk.size=" in out and f"override: {result.override()}" in out
    json.loads(out.strip().splitlines()[-1])
    rows = {(r.chunk_size, r.k): r for r in result.rows}
    assert result.best is not None and result.best.fits
    for r in result.rows:
        if r.k > 1:  # more kept chunks: never less memory, never more recompute
            lower = rows[(r.chunk_size, 1)]
            assert r.peak >= lower.peak and r.recompute_share <= lower.recompute_share
        if r.chunk_size >= result.max_len:
            assert r.recompute_share == 0  # nothing is split
    # the pick: the fastest that fits (up to the 1% tie rule)
    assert all(r.step_time >= result.best.step_time * 0.99 for r in result.rows if r.fits)


def test_cli_says_when_nothing_fits(capsys):
    result = plan_main(["data.num_sequences=50", "plan.memory_budget=1MiB", "plan.overhead=0", "plan.flops_per_s=1e11"])
    out = capsys.readouterr().out
    assert result.best is None and "nothing fits the budget" in out
    assert "budget 1.00 MiB per device (runtime overhead 0 B counted against it)" in out  # not "0.00 GiB"


@pytest.mark.parametrize("overrides,message", [
    (["+chunk.sise=8k"], r"unknown key chunk\.sise; accepted keys: k, layer_checkpoint, offload_state, size$"),
    (["+plan.foo=1"], r"unknown key plan\.foo; accepted keys: "),
    (["parallel.pp=5"], r"parallel\.pp=5 is larger than the model's 4 layers"),
    (["trainer.precision=16-mixed"], r"trainer\.precision=16-mixed is not supported"),
    (["data=jsonl", "data.path=train.jsonl", "+data.max_len=8k"],
     r"data\.max_len applies only to data\.kind=synthetic"),
    (["data.num_sequences=50", "plan.memory_budget=1MiB", "plan.overhead=0", "plan.flops_per_s=1e11"],
     r"no \(chunk\.size, chunk\.k\) candidate fits plan\.memory_budget=1\.00 MiB"),
], ids=["chunk-typo", "plan-typo", "pp-too-large", "16-mixed", "max_len-with-jsonl", "nothing-fits"])
def test_cli_refusals_exit_1_with_one_line_naming_the_key(overrides, message):
    r = subprocess.run([sys.executable, "-m", "chunkflow_pl.plan", *overrides], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and re.match(r"error: " + message, lines[0]), r.stderr[-3000:]


def test_auto_needs_explicit_budget_and_rate_with_several_processes(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "logger=none", "chunk.size=auto", "parallel.dp=2"])
    with pytest.raises(ValueError, match="plan.memory_budget and plan.flops_per_s"):
        train(cfg)


def test_auto_recommendation_for_tiny_trains_and_its_predicted_peak_is_within_30_percent(tmp_path):
    """A short real run (fresh process) with chunk.size=auto chunk.k=auto under a budget that rules out the
    largest settings. Peak memory on both sides = the peak of live tensors the run adds: measured, the
    process's resident high-water mark minus its resident set before the model is built
    (``tests/plan_worker.py``), with glibc's mmap threshold fixed so that freed tensors leave the resident set
    (as in benchmarks/memory_vs_length.py; glibc's default keeps freed heap resident and adds 8-28 MB here);
    predicted, the planner's peak of the recommended setting (which excludes ``plan.overhead``)."""
    g = torch.Generator().manual_seed(0)
    lens = [1500, 450, 350, 200, 750, 150, 1250, 100]  # one global batch: the run covers the whole epoch
    with (tmp_path / "data.jsonl").open("w") as f:
        for n in lens:
            f.write(json.dumps({"input_ids": torch.randint(0, 1024, (n,), generator=g).tolist()}) + "\n")
    overrides = [f"output_dir={tmp_path / 'out'}", "logger=none", "callbacks.progress=null",
                 "callbacks.checkpoint=null", "callbacks.throughput.peak_flops=1e9", "data=jsonl",
                 f"data.path={tmp_path / 'data.jsonl'}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.global_batch_size=8", "data.shuffle=false", "trainer.max_steps=1", "trainer.accelerator=cpu",
                 "chunk.size=auto", "chunk.k=auto", "plan.memory_budget=80MiB", "plan.overhead=0",
                 "plan.flops_per_s=1e10"]
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "plan_worker.py"), *overrides], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 1
    assert [res["chunk_size"], res["k"]] == res["planned"]
    assert res["chunk_size"] < max(lens) and res["peak_state_bytes"] > 0  # a real chunked run, with state
    assert abs(res["predicted"] - res["measured"]) <= 0.3 * res["measured"], res
