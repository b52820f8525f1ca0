"""The process groups of a run: the default group, the ("pp", "dp") mesh, the tie groups, the p2p channels.

``ProcessGroups.create`` is what ``ChunkFlowStrategy.setup_environment`` does with more than one
process (Lightning's launcher, torchrun or SLURM have started them)::

    default group   _init_dist_connection over the cluster environment (NCCL on CUDA, else gloo)
    mesh            init_device_mesh(("pp", "dp_replicate", "dp_shard")), pipeline-major (ParallelDims)
    dp / pp         this rank's data-parallel peers (both dp dims), its replica's stages
    dp_mesh         dp > 1: the ("dp_replicate", "dp_shard") sub-mesh FSDP2 shards over (sharding.py)
    shard           the "dp_shard" group (a gradient norm sums its squares over it)
    tie             pp > 1: one 2-rank group (first stage, last stage) per replica, for a tied embedding
    p2p             pp > 1: P2PTransport, one 2-rank group per channel (stage pair x direction); with virtual
                    stages a dict block -> P2PTransport (channels per block pair x direction)

With one process there are no groups (the strategy holds ``None``) and nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection, _set_num_threads_if_needed

from chunkflow_pl.strategy.dims import ParallelDims
from chunkflow_pl.strategy.health import register_process
from chunkflow_pl.strategy.p2p import P2PTransport, open_block_transports


@dataclass
class ProcessGroups:
    mesh: Any
    dp: Any
    pp: Any
    dp_mesh: Any
    shard: Any
    tie: Any | None  # this rank's tie group (first or last stage with pp > 1), else None
    p2p: P2PTransport | dict[int, P2PTransport] | None
    owns_default: bool  # create() made the default group (destroy() ends it)
    backend: str

    @classmethod
    def create(cls, dims: ParallelDims, rank: int, cluster_environment, device: torch.device, num_processes: int,
               backend: str | None, timeout: timedelta, check_messages: bool) -> ProcessGroups:
        """Every group of the run (collective: every rank calls it, in the same order)."""
        _set_num_threads_if_needed(num_processes=num_processes)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        _init_dist_connection(cluster_environment, backend, timeout=timeout)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, dims.mesh_shape, mesh_dim_names=ParallelDims.MESH_DIM_NAMES)
        tie, p2p = None, None
        if dims.pp > 1:
            for d in range(dims.dp):  # every rank creates every group
                ranks = [dims.rank(0, d), dims.rank(dims.pp - 1, d)]
                g = dist.new_group(ranks, timeout=timeout)  # new groups default to 30 min, not the run's
                if rank in ranks:
                    tie = g
            # Point-to-point channels of every replica (collective: creates and warms up every group).
            comm_device = device if device.type == "cuda" else torch.device("cpu")
            if dims.virtual > 1:
                p2p = open_block_transports(dims, rank, comm_device, dims.virtual, check_messages, timeout=timeout)
            else:
                p2p = P2PTransport(dims, rank, comm_device, check_messages, timeout=timeout)
        register_process(rank, dims.world_size)
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp > 1 else None
        dp = None
        for s in range(dims.pp):  # every rank creates every stage's group, in order
            g = dist.new_group(dims.dp_group_ranks(s), timeout=timeout)
            if rank in dims.dp_group_ranks(s):
                dp = g
        return cls(mesh, dp, mesh.get_group("pp"), dp_mesh, mesh.get_group("dp_shard"), tie, p2p, owns, backend)

    def destroy(self) -> None:
        """End every process group of the run, once this rank is past its last collective (no message).

        A no-op for a default group made by the caller. Why before the interpreter exits: gloo runs
        collectives on worker threads, and a worker may drop the last reference to a collective's tensor
        milliseconds after the collective returned (here for about one collective in seven). The tensor's
        Python object is then freed from that thread, which takes the GIL. Once the interpreter is
        finalising, Python ends such a thread with ``pthread_exit``, whose unwinding through a C++
        ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active exception"
        and SIGABRT after a run that finished. A gloo group joins its threads when its last reference goes,
        so the references held here go first; ``destroy_process_group`` drops torch's own.
        """
        if not self.owns_default:
            return
        self.p2p = None
        self.mesh = self.dp = self.pp = self.tie = self.dp_mesh = self.shard = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self.owns_default = False
