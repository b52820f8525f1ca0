"""A stopped rank 0 is named without asking its store (found by benchmarks/faults.py).

Rank 0 of a run started by Lightning's launcher, srun or directly holds the rendezvous store (under torchrun the
agent holds it). When rank 0 stops answering (SIGSTOP, a debugger), its peer's collective times out and the health
check looked the failed rank's pid up in that store: the store's server was stopped too, so the lookup never
returned and the peer hung for good instead of stopping with an error. Peers are now looked up in the table every
rank reads once at start (``health.register_process``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from conftest import ROOT
from multiproc import free_port

from chunkflow_pl.strategy import health

RANK0 = textwrap.dedent("""
    import os, signal, sys
    from datetime import timedelta
    import torch.distributed as dist
    from chunkflow_pl.strategy import health
    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=2, timeout=timedelta(seconds=20))
    health.register_process(0, 2)
    dist.barrier()
    os.kill(os.getpid(), signal.SIGSTOP)  # hung, holding the store
""")


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def test_a_stopped_rank_0_is_named_by_its_peer_within_seconds():
    url = f"tcp://127.0.0.1:{free_port()}"
    child = subprocess.Popen([sys.executable, "-c", RANK0, url], env={**os.environ, "PYTHONPATH": str(ROOT)})
    dist.init_process_group("gloo", init_method=url, rank=1, world_size=2, timeout=timedelta(seconds=20))
    found: list[str | None] = []
    try:
        health.register_process(1, 2)
        dist.barrier()
        deadline = time.monotonic() + 60
        while not _stopped(child.pid):
            assert time.monotonic() < deadline and child.poll() is None, "rank 0 did not stop itself"
            time.sleep(0.05)
        t = threading.Thread(target=lambda: found.append(health.describe_failure(1, 2, step=4)), daemon=True)
        t.start()
        t.join(timeout=30)
        assert found, "describe_failure did not return within 30 s with rank 0 (the store's holder) stopped"
        assert found[0] is not None and "rank 1: rank(s) [0] of this run stopped answering during step 4" in found[0]
    finally:
        child.kill()
        child.wait()
        dist.destroy_process_group()
