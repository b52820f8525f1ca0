"""A checkpoint written by pipeline stages resumes under the same stages (found by benchmarks/faults.py: every
pp=2 run resumed from its own checkpoint died at its first AdamW step with ``KeyError: 'betas'``).

Each stage's optimizer has its own parameter groups (decay / no decay) over other parameters. DCP's nested
optimizer format keys a group by its index (``optimizer_0.param_groups.0.params``), the same key on every stage,
and keeps one rank's copy of a key written by several: the other stage then loads groups naming parameters it does
not hold. Here two ranks hold differently named modules, as two stages do, and save and load through the
strategy's checkpoint functions over gloo.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from multiproc import free_port, spawn_ranks

from chunkflow_pl.strategy import checkpoint as ckpt
from chunkflow_pl.training.optim import param_groups


def _stage(rank: int) -> torch.nn.Module:
    torch.manual_seed(10 + rank)
    body = torch.nn.Sequential(torch.nn.Linear(4, 4 + rank), torch.nn.LayerNorm(4 + rank))
    return torch.nn.ModuleDict({f"stage{rank}": body})  # other names on each rank, as pipeline stages have


def _step(module: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = _stage(rank).double()
        opt = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-2)
        _step(module, opt, 1)
        path = Path(folder) / "stages.ckpt"
        ckpt.save_checkpoint({"global_step": 1}, path, module, [opt], rank == 0, barrier=lambda name: dist.barrier())
        _step(module, opt, 2)  # the uninterrupted run's second step

        fresh = _stage(rank).double()
        fresh_opt = torch.optim.AdamW(param_groups(fresh, 0.1), lr=1e-2)
        ckpt.load_checkpoint(path, fresh, [fresh_opt])
        _step(fresh, fresh_opt, 2)  # the resumed run's
        same = all(torch.equal(a, b) for a, b in zip(module.parameters(), fresh.parameters()))
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"same": same}))
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_of_two_pipeline_stages_resumes_both_exactly(tmp_path):
    spawn_ranks(_worker, (free_port(), str(tmp_path)), hang="saving or loading the stages' checkpoint hangs")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"same": True}, rank
