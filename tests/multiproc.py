"""Run ``train.py`` as a user would, in 1 process or under ``torchrun --standalone`` (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Two global batches of 7: packed short sequences and split ones at chunk.size=32.
LENS = [7, 64, 100, 33, 2, 70, 32, 5, 90, 40, 3, 12, 66, 20]


def write_token_records(path: Path, lens: list[int] = LENS, vocab: int = 97, seed: int = 2):
    """A JSONL file of random token ids and labels, with an unsupervised prompt inside a split sequence."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    labels = [s.clone() for s in seqs]
    labels[2][:30] = -100
    with open(path, "w") as f:
        for s, y in zip(seqs, labels):
            f.write(json.dumps({"input_ids": s.tolist(), "labels": y.tolist()}) + "\n")
    return seqs, labels


def train_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_cmd(nproc: int, *overrides: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(ROOT / "train.py"), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"), *overrides]


def run_train(nproc: int, run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; raise with the output's tail if it fails."""
    cmd = train_cmd(nproc, "logger=none", "callbacks.progress=null", "trainer.enable_model_summary=false",
                    "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}", *overrides)
    out = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {out.returncode}\n{(out.stdout + out.stderr)[-4000:]}")
    return out


def spawn_ranks(fn, args: tuple, nprocs: int = 2, timeout: float = 120, hang: str = "the ranks hang") -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; a hang fails with ``hang`` after ``timeout`` s
    (and kills what is left) instead of stalling the suite; a rank that raises fails it too."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, hang
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a spawned group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_strategy(rank: int, port: int, dims):
    """In a spawned rank of a 2-process run: a ChunkFlowStrategy for ``dims`` on the CPU, its process groups made
    (``setup_environment``: default group, mesh, and with pp > 1 the tied-embedding group and p2p channels)."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.accelerators import CPUAccelerator

    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    strategy = ChunkFlowStrategy(dims, accelerator=CPUAccelerator(), parallel_devices=[torch.device("cpu")] * 2,
                                 cluster_environment=LightningEnvironment())
    strategy.setup_environment()
    return strategy
