"""The layout owner (ParallelDims), launch resolution and dead-peer diagnosis: pure checks, no training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.distributed as dist

from chunkflow_pl.strategy import health
from chunkflow_pl.strategy.dims import ParallelDims, world_from_launch


def test_layout_is_pipeline_major():
    d = ParallelDims(dp=2, pp=3, world_size=6, num_layers=4)
    assert [d.coords(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert d.dp_group_ranks(1) == [2, 3] and d.pp_group_ranks(1) == [1, 3, 5]
    assert all(d.rank(*d.coords(r)) == r for r in range(6))


@pytest.mark.parametrize("kw,msg", [
    (dict(dp=2, pp=2, world_size=2), r"2 x 2 = 4 processes, but the run has 2"),
    (dict(dp=1, pp=5, world_size=5, num_layers=4), r"parallel.pp=5 is larger than the model's 4 layers"),
    (dict(dp=0, pp=1, world_size=0), r"parallel.dp=0 must be a positive integer"),
])
def test_bad_layouts_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ParallelDims(**kw)


def test_world_from_launch():
    assert world_from_launch("auto", 1, 2, 2, {}) == (4, 1, False)
    assert world_from_launch(2, 1, 2, 1, {}) == (2, 1, False)
    assert world_from_launch("auto", 1, 2, 1, {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"}) == (2, 2, True)
    assert world_from_launch("auto", 1, 4, 1, {"SLURM_NTASKS": "8", "SLURM_NNODES": "2",
                                               "SLURM_JOB_NAME": "train"}) == (4, 2, True)
    with pytest.raises(ValueError, match="torchrun started 2 process"):
        world_from_launch(4, 1, 2, 1, {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="do not split over trainer.num_nodes=2"):
        world_from_launch("auto", 2, 3, 1, {})


def test_a_dead_peer_is_named(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        health.register_process(0)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # reaped: its pid no longer exists
        s = health._store()
        s.set("chunkflow/proc/1", f"{health.socket.gethostname()} {gone.pid}")
        s.set("chunkflow/proc/2", f"{health.socket.gethostname()} {health.os.getpid()}")
        msg = health.describe_failure(0, 3, step=7)
        assert msg is not None and "rank(s) [1]" in msg and "step 7" in msg
        s.set("chunkflow/proc/1", f"{health.socket.gethostname()} {health.os.getpid()}")
        assert health.describe_failure(0, 3, step=7) is None  # everybody alive: no diagnosis
    finally:
        dist.destroy_process_group()


def test_a_sharded_layout_that_does_not_fill_the_world_names_the_sharding_keys():
    """dp_shard=3 on 2 processes names dp_replicate x dp_shard x pp (what the user set) and a dp_shard fix; a
    replicated layout keeps naming parallel.dp."""
    from chunkflow_pl.strategy.dims import ParallelDims

    with pytest.raises(ValueError, match=r"parallel\.dp_replicate x parallel\.dp_shard x parallel\.pp = 1 x 3 x 1 = 3 "
                                         r"processes, but the run has 2 .* e\.g\. parallel\.dp_shard=2"):
        ParallelDims(dp=3, pp=1, world_size=2, dp_shard=3)
    with pytest.raises(ValueError, match=r"parallel\.dp x parallel\.pp = 3 x 1 = 3 processes, .* parallel\.dp=2"):
        ParallelDims(dp=3, pp=1, world_size=2)
