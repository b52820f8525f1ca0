"""The strategy's ``reduce``: torch's ReduceOp or one of Lightning's exact strings, nothing guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from multiproc import free_port, spawn_ranks

from chunkflow_pl.strategy.collectives import reduce, resolve_reduce_op
from chunkflow_pl.strategy.dims import ParallelDims


@pytest.mark.parametrize(("op", "want"), [
    (dist.ReduceOp.SUM, (dist.ReduceOp.SUM, False)),
    (dist.ReduceOp.MAX, (dist.ReduceOp.MAX, False)),
    (dist.ReduceOp(dist.ReduceOp.MIN), (dist.ReduceOp.MIN, False)),  # a ReduceOp instance, not its enum value
    (dist.ReduceOp.AVG, (dist.ReduceOp.SUM, True)),  # gloo has no AVG: a sum, divided
    ("mean", (dist.ReduceOp.SUM, True)),
    ("avg", (dist.ReduceOp.SUM, True)),
    ("sum", (dist.ReduceOp.SUM, False)),
    ("max", (dist.ReduceOp.MAX, False)),  # LightningModule.log(reduce_fx=max, sync_dist=True) passes "max"
    ("min", (dist.ReduceOp.MIN, False)),
    (None, (dist.ReduceOp.SUM, False)),  # as Lightning's _sync_ddp
])
def test_reduce_ops_are_looked_up_exactly(op, want):
    assert resolve_reduce_op(op) == want


@pytest.mark.parametrize("op", ["MEAN", "maximum", "reduceop.sum", "RedOpType.SUM", "", 3, torch.max])
def test_anything_else_is_a_value_error(op):
    with pytest.raises(ValueError, match="takes a torch.distributed.ReduceOp or one of"):
        resolve_reduce_op(op)


def test_strategy_rejects_a_bad_op_with_one_process_too():
    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy

    strategy = ChunkFlowStrategy(ParallelDims(dp=1, pp=1, world_size=1, num_layers=2))
    t = torch.tensor([2.0])
    assert strategy.reduce(t, reduce_op=dist.ReduceOp.MAX) is t  # one process: the value itself
    with pytest.raises(ValueError, match="reduce_op='maximum'"):
        strategy.reduce(t, reduce_op="maximum")


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64)  # rank 0: [1, 10], rank 1: [2, 20]
        ops = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", "SUM": dist.ReduceOp.SUM,
               "MAX": dist.ReduceOp.MAX, "AVG": dist.ReduceOp.AVG, "PRODUCT": dist.ReduceOp.PRODUCT}
        got = {name: reduce(x, reduce_op=op).tolist() for name, op in ops.items()}
        got["input"] = x.tolist()  # reduce works on a copy
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_over_two_gloo_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_reduce_worker, (free_port(), str(tmp_path)))
    want = {"mean": [1.5, 15.0], "sum": [3.0, 30.0], "max": [2.0, 20.0], "min": [1.0, 10.0], "SUM": [3.0, 30.0],
            "MAX": [2.0, 20.0], "AVG": [1.5, 15.0], "PRODUCT": [2.0, 200.0]}
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got.pop("input") == [r + 1.0, 10.0 * (r + 1)]
        assert got == want, (r, got)
