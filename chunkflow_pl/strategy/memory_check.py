"""The memory check before allocation: one device's training memory for the run's layout, and the refusal.

``ChunkFlowStrategy`` runs it in ``setup_environment`` (through ``fit_setup.py``): after Lightning started the
processes, before any process group, before the LightningModule builds its layers (``configure_model``). Every
rank computes the same number (the pipeline stage that needs the most), so all ranks refuse together.
``train.py dry_run=true`` prints the same estimate without a Trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.model.config import LoraSettings, ModelConfig
from chunkflow_pl.model.memory import (
    InsufficientMemoryError,
    MemoryEstimate,
    Sharding,
    available_memory,
    estimate_training_memory,
)
from chunkflow_pl.model.stages import rank_blocks, split_stages
from chunkflow_pl.schedule.scheduler import default_caps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryRequest:
    """What one device's training memory depends on. ``longest_sequence``: tokens of the longest sequence of
    the data (its K/V state is kept while it is split); ``pp``: pipeline stages (each holds its own layers)."""

    model: ModelConfig
    chunk_size: int
    chunk_k: int
    precision: str
    optimizer: str
    loss_chunk: int
    longest_sequence: int
    pp: int = 1
    lora: LoraSettings | None = None  # adapters: only they hold gradients and optimizer state
    layer_checkpoint: str = "none"  # chunk.layer_checkpoint
    sharding: Sharding = Sharding()  # the data parallelism of each stage (FSDP2 when dp > 1)
    virtual: int = 1  # parallel.virtual_stages: blocks per pipeline rank


def sharding_of(parallel: ParallelConfig) -> Sharding:
    """The ``parallel`` group's data parallelism as the estimate takes it (``parallel.dp`` alone: replicas;
    ``grad_reduce=auto`` as ``last_backward`` until ``settle_grad_reduce`` picks)."""
    return Sharding(parallel.dp_shard, parallel.data_parallel // parallel.dp_shard,
                    settled_or_last(parallel.grad_reduce), parallel.reshard_after_forward)


def settled_or_last(grad_reduce: str) -> str:
    return "last_backward" if grad_reduce == "auto" else grad_reduce


def pick_grad_reduce(req: MemoryRequest, avail: int) -> str:
    """``parallel.grad_reduce=auto`` for this layout, as the layout planner would pick it: ``last_backward`` (one
    reduce per step, fewest collectives: always the faster) when its per-rank estimate fits ``avail`` bytes, else
    ``every_backward`` (no unsharded gradient held across backwards) when that needs less. Without sharding, or with
    pp > 1 (where every_backward is refused), ``last_backward``."""
    if req.sharding.dp_shard == 1 or req.pp > 1:
        return "last_backward"
    last = estimate(replace(req, sharding=replace(req.sharding, grad_reduce="last_backward")))
    if last.total <= avail:
        return "last_backward"
    every = estimate(replace(req, sharding=replace(req.sharding, grad_reduce="every_backward")))
    return "every_backward" if every.total < last.total else "last_backward"


def settle_grad_reduce(req: MemoryRequest, grad_reduce: str, device_type: str) -> MemoryRequest:
    """The request with ``parallel.grad_reduce`` settled: as set, or for ``auto`` ``pick_grad_reduce``'s choice for
    the memory ``device_type`` has (logged)."""
    if grad_reduce != "auto":
        return req
    choice = pick_grad_reduce(req, available_memory(device_type))
    if req.sharding.dp_shard > 1 and req.pp == 1:
        log.info("parallel.grad_reduce=auto: %s (%s)", choice,
                 "its estimate fits the device" if choice == "last_backward" else
                 "last_backward's unsharded gradient does not fit the device")
    return replace(req, sharding=replace(req.sharding, grad_reduce=choice))


def stage_estimates(req: MemoryRequest) -> list[MemoryEstimate]:
    """One estimate per pipeline stage (every rank of a stage holds the same): its layers, its plan's cap on
    live chunks, its shard of the model state.

    Virtual stages: one per pipeline rank, over all its blocks' layers, each layer counted with the largest cap of
    the rank's blocks (the scheduler's caps, ``default_caps`` over the blocks; conservative: the planner,
    ``plan/core.stage_peaks``, sums per-block estimates with each block's own cap instead); a rank holding block 0
    is counted without boundary checkpoints (its other blocks keep some: one ``[T, D]`` input per dropped chunk,
    small beside a chunk's layer activations)."""
    if req.virtual > 1:
        blocks_caps = default_caps(req.pp * req.virtual, req.chunk_k)
        ranks = [rank_blocks(req.model.num_layers, req.pp, req.virtual, r) for r in range(req.pp)]
        return [estimate_training_memory(req.model, req.chunk_size, req.chunk_k, req.precision, req.optimizer,
                                         req.loss_chunk, max_seq_len=req.longest_sequence, stage=spec,
                                         live_chunks=max(blocks_caps[b] for b in spec.ids),
                                         layer_checkpoint=req.layer_checkpoint, lora=req.lora, sharding=req.sharding)
                for spec in ranks]
    return [estimate_training_memory(req.model, req.chunk_size, req.chunk_k, req.precision, req.optimizer,
                                     req.loss_chunk, max_seq_len=req.longest_sequence, stage=spec, live_chunks=cap,
                                     layer_checkpoint=req.layer_checkpoint, lora=req.lora, sharding=req.sharding)
            for spec, cap in zip(split_stages(req.model.num_layers, req.pp), default_caps(req.pp, req.chunk_k))]


def estimate(req: MemoryRequest) -> MemoryEstimate:
    """The estimate of the device that needs the most: the whole model, or the largest pipeline stage."""
    return max(stage_estimates(req), key=lambda e: e.total)


def per_rank_table(req: MemoryRequest) -> str:
    """``dry_run``'s print: each pipeline stage's ranks (pipeline-major, as ``ParallelDims`` lays them out) and
    their estimate."""
    dp = req.sharding.dp
    out = []
    for s, est in enumerate(stage_estimates(req)):
        ranks = f"ranks {s * dp}..{s * dp + dp - 1}" if dp > 1 else f"rank {s}"
        out.append(f"{ranks} (pipeline stage {s} of {req.pp}, data-parallel {req.sharding.dp_replicate} x "
                   f"{req.sharding.dp_shard} sharded, {req.sharding.grad_reduce}):\n{est.table()}")
    return "\n".join(out)


def log_estimate(req: MemoryRequest, est: MemoryEstimate, device_type: str, avail: int) -> None:
    m = req.model
    several = req.pp > 1 or req.sharding.dp > 1
    log.info("model %s: %.3f B parameters; estimated training memory%s at %s, chunk.size=%d, k=%d, "
             "layer_checkpoint=%s, longest sequence %d tokens:\n%s\n  available on %s: %.2f GiB", m.name,
             m.num_params() / 1e9, " per rank" if several else "", req.precision, req.chunk_size, req.chunk_k,
             req.layer_checkpoint, req.longest_sequence, per_rank_table(req) if several else est.table(), device_type,
             avail / 2**30)


def check_memory(req: MemoryRequest, device_type: str, refuse: bool = True) -> MemoryEstimate:
    """Log the estimate; raise ``InsufficientMemoryError`` (what to change named) when it exceeds what
    ``device_type`` has and ``refuse`` is set (``check_memory=false`` tries anyway)."""
    est = estimate(req)
    avail = available_memory(device_type)
    log_estimate(req, est, device_type, avail)
    if refuse and est.total > avail:
        per_rank = " per rank" if req.sharding.dp > 1 or req.pp > 1 else ""
        gathered = f"gathered parameters {est.gathered / 2**30:.1f}, " if est.gathered else ""
        raise InsufficientMemoryError(
            f"model={req.model.name} needs about {est.total / 2**30:.1f} GiB{per_rank} "
            f"to train (weights {est.weights / 2**30:.1f}, {gathered}gradients {est.grads / 2**30:.1f}, "
            f"{req.optimizer} state "
            f"{est.optimizer / 2**30:.1f}, activations {est.activations / 2**30:.1f}, K/V state "
            f"{est.state / 2**30:.1f}) but {device_type} has "
            f"{avail / 2**30:.1f} GiB available. Use a machine with more memory, a smaller model "
            f"(model=tiny, model=qwen0.5b), a smaller chunk.size, chunk.layer_checkpoint=full, more ranks "
            f"(parallel.dp_shard, parallel.pp; python -m chunkflow_pl.plan finds a layout), "
            f"trainer.precision=bf16-true, optim=sgd, or "
            f"check_memory=false "
            f"to try anyway.")
    return est
