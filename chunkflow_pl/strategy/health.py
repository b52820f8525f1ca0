"""Name the rank that failed instead of hanging or reporting a socket error.

At start every rank records ``(host, pid)`` in the process group's key-value store and reads everybody's back
into a table (the store itself lives in rank 0, or in torchrun's agent, and may be what failed). When a collective
or point-to-point call fails (gloo reports a closed connection at once; NCCL, and any backend waiting on
a peer that is alive but stopped, after the process group timeout ``parallel.collective_timeout``), the
surviving rank looks up which peers on its host no longer exist or are stopped and raises
``PeerFailure`` naming them. Peers on other hosts cannot be probed: the message then lists them as
unknown, and the launcher (torchrun, srun) reports the failed rank itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank of the run died or stopped answering."""


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a torch without the helper
        return None


# Every rank's "host pid", read once at start: when a collective fails the store may be what failed (rank 0
# holds it outside torchrun; stopped, a store lookup never returns).
_peers: dict[int, str] = {}


def register_process(rank: int, world_size: int | None = None) -> None:
    """Record this rank's host and pid in the store; with ``world_size`` (every rank calls it at start) also read
    every rank's into the table the health check uses, so naming a failed peer never needs the store."""
    _peers.clear()  # a new process group: the last one's ranks are not this one's
    store = _store()
    if store is None:
        return
    store.set(f"chunkflow/proc/{rank}", f"{socket.gethostname()} {os.getpid()}")
    for r in range(world_size or 0):
        try:
            _peers[r] = store.get(f"chunkflow/proc/{r}").decode()  # waits for ranks not there yet
        except Exception:  # a peer that never registered: the check falls back to the store
            _peers.pop(r, None)


def _state(pid: int) -> str:
    """``"dead"``, ``"stopped"`` (SIGSTOP, a debugger: alive but never answering) or ``"alive"``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    try:  # a dead child not yet reaped by its parent (Lightning's launcher) is a zombie: 'Z' in /proc
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "alive"
    return "dead" if state in ("Z", "X") else "stopped" if state in ("T", "t") else "alive"


def describe_failure(rank: int, world_size: int, step: int | None) -> str | None:
    """A message naming the dead peer(s) of ``rank``, or None when every peer still looks alive."""
    store = _store()
    host = socket.gethostname()
    dead, stopped, unknown = [], [], []
    for r in range(world_size):
        if r == rank:
            continue
        try:
            if store is None and r not in _peers:
                raise RuntimeError("no store")
            h, pid = (_peers.get(r) or store.get(f"chunkflow/proc/{r}").decode()).split()
        except Exception:
            unknown.append(r)
            continue
        if h == host:
            state = _state(int(pid))
            if state == "dead":
                dead.append(r)
            elif state == "stopped":
                stopped.append(r)
        else:
            unknown.append(r)
    where = f" during step {step}" if step is not None else ""
    if dead:
        return (f"rank {rank}: rank(s) {dead} of this run died{where} (process gone); stopping this rank too. "
                f"Resume from the last checkpoint with ckpt_path=...")
    if stopped:  # found after the collective timed out (parallel.collective_timeout)
        return (f"rank {rank}: rank(s) {stopped} of this run stopped answering{where} (process stopped: SIGSTOP or "
                f"a debugger; waited parallel.collective_timeout); stopping this rank too. Resume from the last "
                f"checkpoint with ckpt_path=...")
    if store is None or len(unknown) == world_size - 1:
        return (f"rank {rank}: lost contact with the other ranks{where} (the rank holding the rendezvous store, "
                f"rank 0, may have died); stopping this rank too")
    return None


@contextmanager
def peer_failures(rank: int, world_size: int, step: int | None) -> Iterator[None]:
    """Re-raise a failed collective or message as ``PeerFailure`` naming the dead peer, when one is found."""
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as e:
        if world_size > 1:
            msg = describe_failure(rank, world_size, step)
            if msg:
                raise PeerFailure(msg) from e
        raise
