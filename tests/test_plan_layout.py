"""The layout planner (issue 21 item 6) and the sharded memory estimate's arithmetic: pure, no torch, no process.

The done-when of the issue (Qwen2.5-7B at chunk 32K on 8 x 80 GB, Qwen2.5-72B on 64 x 80 GB, as the planner's
CLI prints them), the pricing of FSDP2's collectives, the pick, and the refusals of the new ``plan`` keys.
"""

from __future__ import annotations

import math

import pytest

from chunkflow_pl.model.config import get_preset
from chunkflow_pl.model.memory import InsufficientMemoryError, Sharding, estimate_training_memory
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.plan.__main__ import main as plan_main
from chunkflow_pl.plan.core import PlanSpec
from chunkflow_pl.plan.layout import ClusterSpec, plan_layout
from chunkflow_pl.plan.settings import PlanSettings
from chunkflow_pl.schedule.cost import FsdpComm, Links
from chunkflow_pl.strategy.memory_check import MemoryRequest, check_memory

CLUSTER = ["trainer.precision=bf16-mixed", "plan.device_memory=80GB", "plan.overhead=2GiB", "plan.flops_per_s=4e14",
           "data.num_sequences=256", "data.global_batch_size=64", "plan.num_batches=1"]


@pytest.mark.parametrize("model,cards,extra", [("qwen7b", 8, ["chunk.size=32k"]), ("qwen72b", 64, [])],
                         ids=["7b-chunk32k-on-8", "72b-on-64"])
def test_the_issue_presets_fit_as_printed_by_the_planner(capsys, model, cards, extra):
    result = plan_main([f"model={model}", f"plan.devices={cards}", *CLUSTER, *extra])
    out = capsys.readouterr().out
    assert result.best is not None and result.best.fits, out
    lay = result.best.layout
    assert lay.pp * lay.dp_replicate * lay.dp_shard == cards
    assert result.best.peak + 2 * 2**30 <= 80 * 10**9
    if extra:
        assert lay.chunk_size == 32 * 1024  # the command's chunk size is kept (searched only with chunk.size=auto)
    assert f"override: {result.override()}" in out and "parallel.dp_shard=" in result.override()
    # every printed pick is one the runtime accepts: every_backward only without a pipeline, never resharding
    assert all(r.layout.pp == 1 for r in result.rows if r.layout.grad_reduce == "every_backward")


def test_sharding_shrinks_the_per_rank_model_state_and_the_planner_needs_it():
    cfg = get_preset("qwen7b")
    plain = estimate_training_memory(cfg, 32768, 1, "bf16-mixed", layer_checkpoint="full")
    one, eight = (estimate_training_memory(cfg, 32768, 1, "bf16-mixed", layer_checkpoint="full",
                                           sharding=Sharding(dp_shard=p, dp_replicate=8 // p)) for p in (1, 8))
    n = cfg.num_params()
    assert eight.weights == pytest.approx(4 * n / 8, rel=1e-6) and eight.optimizer == pytest.approx(8 * n / 8, rel=1e-6)
    assert eight.gathered == 2 * n and eight.grads == 4 * n  # bf16 compute copy, fp32 unsharded gradient
    assert eight.total < one.total <= plain.total + one.gathered + one.buffers  # replicas: + the gathered copy
    every = estimate_training_memory(cfg, 32768, 1, "bf16-mixed", layer_checkpoint="full",
                                     sharding=Sharding(dp_shard=8, grad_reduce="every_backward"))
    assert every.total < eight.total  # the gradient is built while the chunk's activations are freed
    reshard = estimate_training_memory(cfg, 32768, 1, "bf16-mixed", layer_checkpoint="full",
                                       sharding=Sharding(dp_shard=8, reshard_after_forward=True))
    root = n - cfg.num_layers * cfg.layer_params  # embedding + head: the largest unit
    assert reshard.gathered == 2 * root * 2 < eight.gathered / 3  # the unit computing and the one prefetched


def test_collectives_are_priced_from_the_links():
    fast, slow = Links(8, 3200, 400), Links(8, 3200, 100)
    comm = FsdpComm(10**9, 10**9, 2, 4, dp_shard=8, dp_replicate=1)
    assert comm.step_time(fast, 40, 10) == comm.step_time(slow, 40, 10)  # one node: the inter link is unused
    wide = FsdpComm(10**9, 10**9, 2, 4, dp_shard=16, dp_replicate=1)
    assert wide.step_time(slow, 40, 10) > 3 * wide.step_time(fast, 40, 10)  # crosses nodes
    # gather 2 GB once + reduce-scatter 4 GB once, 7/8 of each over 400 GB/s, plus 7 latencies each
    assert comm.step_time(fast, 40, 10) == pytest.approx(7 / 8 * 6e9 / 400e9 + 14 * fast.latency_s)
    every = FsdpComm(10**9, 10**9, 2, 4, 8, 1, grad_reduce="every_backward")
    assert every.step_time(fast, 40, 10) == pytest.approx(fast.ring(2e9, 8, 8) + 10 * fast.ring(4e9, 8, 8))
    reshard = FsdpComm(10**9, 10**9, 2, 4, 8, 1, reshard_after_forward=True)
    assert reshard.step_time(fast, 40, 10) == pytest.approx(40 * fast.ring(2e9, 8, 8) + fast.ring(4e9, 8, 8))
    hsdp = FsdpComm(10**9, 10**9, 2, 4, dp_shard=8, dp_replicate=2)
    assert hsdp.step_time(fast, 1, 1) > comm.step_time(fast, 1, 1)  # + the all-reduce of the shard


def test_pick_is_the_fastest_that_fits_and_slow_links_move_it():
    cfg = get_preset("qwen7b", num_layers=8)
    lens = [[30000, 9000, 4000, 2000, 1500, 800, 600, 300] * 2]
    spec = PlanSpec(memory_budget=0, precision="bf16-mixed", chunk_sizes=(8192,), ks=(1,), flops_per_s=4e14)
    result = plan_layout(cfg, spec, ClusterSpec(16, 40 * 2**30), lens)
    fitting = [r for r in result.rows if r.fits]
    assert result.best in fitting and len(fitting) < len(result.rows)
    assert all(result.best.step_time <= r.step_time * 1.01 for r in fitting)
    assert all(math.isnan(r.step_time) for r in result.rows if not r.fits)
    slow = plan_layout(cfg, spec, ClusterSpec(16, 40 * 2**30, Links(8, 3200, 1)), lens)
    assert slow.best.comm_time < result.best.comm_time or slow.best.layout != result.best.layout


@pytest.mark.parametrize("key,value,message", [
    ("devices", 0, r"plan\.devices=0 must be a positive integer"),
    ("devices_per_node", True, r"plan\.devices_per_node=True must be an integer"),
    ("device_memory", "80 gigs", r"plan\.device_memory='80 gigs'"),
    ("intra_node_gbps", -1, r"plan\.intra_node_gbps=-1(\.0)? must be a positive number"),
    ("inter_node_gbps", "fast", r"plan\.inter_node_gbps"),
])
def test_bad_cluster_keys_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        PlanSettings.from_dict({key: value})


def test_memory_check_refuses_a_sharded_pipeline_that_does_not_fit_naming_the_fixes():
    """Issue 21 item 10: dp_shard x pp where nothing fits stops before allocation, naming the keys to change."""
    req = MemoryRequest(get_preset("qwen72b"), 32768, 1, "bf16-mixed", "adamw", 4096, 32768, pp=2,
                        sharding=Sharding(dp_shard=2))
    assert len(split_stages(80, 2)) == 2
    with pytest.raises(InsufficientMemoryError, match=r"per rank.*parallel\.dp_shard, parallel\.pp; python -m "
                                                      r"chunkflow_pl\.plan finds a layout"):
        check_memory(req, "cpu")


def test_parallel_auto_fills_the_layout_the_runtime_then_accepts():
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from chunkflow_pl.config import ChunkConfig, ParallelConfig
    from chunkflow_pl.plan.auto import resolve_auto_layout
    from chunkflow_pl.plan.settings import model_config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["parallel=auto", "model=qwen7b", "plan.devices=8", "chunk.size=32k",
                                          *CLUSTER])
    out = resolve_auto_layout(cfg, model_config(cfg.model))
    parallel, chunk = ParallelConfig.from_dict(out.parallel), ChunkConfig.from_dict(out.chunk)
    assert not parallel.auto and parallel.world_size == 8 and chunk.size == 32 * 1024
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bad = compose("train", overrides=["parallel=auto", "plan.devices=8", "plan.flops_per_s=null"])
    with pytest.raises(ValueError, match=r"parallel=auto needs plan\.flops_per_s"):
        resolve_auto_layout(bad, model_config(bad.model))


def test_the_layout_search_runs_without_torch():
    """DESIGN.md: planning is pure; the layout search (memory estimate, simulator, collectives) imports no torch."""
    import subprocess
    import sys

    from conftest import ROOT

    code = """
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.plan.core import PlanSpec
from chunkflow_pl.plan.layout import ClusterSpec, plan_layout
spec = PlanSpec(memory_budget=0, precision="bf16-mixed", chunk_sizes=(4096,), ks=(1,))
print(plan_layout(get_preset("qwen7b", num_layers=4), spec, ClusterSpec(4, 80 * 10**9), [[9000, 300, 20]]).best.fits)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
