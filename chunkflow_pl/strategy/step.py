"""Step execution of one rank: its stage's ``StepRunner`` (schedule layer), then the step's numbers job-wide.

Every layout takes the same path (``schedule/runner.py``): the replica's step plan, this rank's stage
of it on one executor, the caps check, the optional timeline. What is the strategy's own:

- the runner's transport: ``P2PTransport`` over the pipeline's channels (pp > 1), none with one stage;
  with virtual stages one per block of the rank (``open_block_transports``);
- ``compare_plans`` (debug, ``parallel.check_messages``): before any message moves, the replica's ranks
  gather their plan fingerprints and chunk sizes and the first rank and chunk that differ are named,
  instead of letting mismatched lists hang;
- on recorded steps, a barrier over the replica's stages: one time origin for their timelines;
- ``global_stats``: loss and tokens summed over data parallelism (the loss from the last stage), and
  the compute-time imbalance between data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.schedule.evaluation import EvalSums
from chunkflow_pl.schedule.executor import StepInterrupted, StepStats
from chunkflow_pl.schedule.pipeline_actions import PipelinePlan
from chunkflow_pl.schedule.runner import StepRun, StepRunner
from chunkflow_pl.strategy.collectives import all_reduce_scalars
from chunkflow_pl.strategy.dims import ParallelDims
from chunkflow_pl.strategy.groups import ProcessGroups
from chunkflow_pl.strategy.sharding import ShardedStage


class PlanDivergence(RuntimeError):
    """Ranks of one pipeline replica built different plans for the same step."""


@dataclass(frozen=True)
class StepSettings:
    k: int  # chunk.k: chunks per chain whose activations are kept
    offload_state: bool = False
    check_plan: bool = True  # prove each step's plan valid before running it
    check_messages: bool = False  # pp > 1: compare plans across the replica every step (debug)
    split_backward: bool = False  # parallel.split_backward: B and W actions (the model has SplitLinear layers)


class RankStep:
    """The steps of rank ``rank`` (stage and replica from ``dims``) on ``device``."""

    def __init__(self, dims: ParallelDims, rank: int, device: torch.device, settings: StepSettings) -> None:
        self.dims, self.rank, self.device, self.settings = dims, rank, device, settings
        self.stage, self.dp_rank = dims.coords(rank)
        self._runner: StepRunner | None = None

    def runner(self, model: torch.nn.Module, groups: ProcessGroups | None) -> StepRunner:
        """This rank's runner, built at its first step from the model's config (same on every rank)."""
        if self._runner is None:
            transport = groups.p2p if groups is not None else None
            if self.dims.pp > 1 and transport is None:
                raise RuntimeError("setup_environment creates the pipeline's channels")
            self._runner = StepRunner(model.cfg, self.settings.k, self.device, stage=self.stage, pp=self.dims.pp,
                                      offload_state=self.settings.offload_state, transport=transport,
                                      check_plan=self.settings.check_plan, rank=self.rank, dp_rank=self.dp_rank,
                                      split_backward=self.settings.split_backward,
                                      virtual=self.dims.virtual)
        return self._runner

    def run(self, model: torch.nn.Module, batch: StepBatch, groups: ProcessGroups | None,
            should_stop: Callable[[], bool] | None, record: bool, sharded: ShardedStage | None = None) -> StepRun:
        """This rank's stage of the replica's plan for ``batch``; ``run.stats`` summed over the job.

        ``sharded`` (dp > 1): the stage's FSDP units, all-gathered before the first action and reduced after
        backward actions and at the end (``sharding.py``); a stopped step drops its gradients there."""
        pp_group = groups.pp if groups is not None else None
        on_plan = time_origin = None
        if self.settings.check_messages and self.dims.pp > 1:
            def on_plan(plan: PipelinePlan) -> None:
                compare_plans(plan, self.rank, pp_group, self.dims.pp_group_ranks(self.dp_rank), batch.step_index)
        if self.dims.pp > 1:
            def time_origin() -> None:  # a common time origin for the replica's stages
                dist.barrier(group=pp_group, **({"device_ids": [self.device.index]}
                                                if self.device.type == "cuda" else {}))
        runner = self.runner(model, groups)
        if sharded is not None:
            sharded.begin_step(len(batch.chunks))
        try:
            run = runner.run(model, batch, should_stop=should_stop, record=record, on_plan=on_plan,
                             time_origin=time_origin, after_backward=sharded.after_backward if sharded else None)
        except StepInterrupted:
            if sharded is not None:
                sharded.abandon_step()
            raise
        if sharded is not None:
            sharded.end_step()
        global_stats(run.stats, groups, self.dims, self.stage == self.dims.pp - 1, self.device)
        return run

    def evaluate(self, model: torch.nn.Module, batch: StepBatch, groups: ProcessGroups | None, sums: EvalSums,
                 sharded: ShardedStage | None = None) -> StepRun:
        """This rank's stage of the replica's forward-only plan for ``batch`` (validation); the last stage adds its
        tokens' losses to ``sums``. Nothing is reduced here: the caller sums ``sums`` over ranks once per pass.
        ``sharded``: the stage's FSDP units, all-gathered before the first chunk and resharded after the last."""
        runner = self.runner(model, groups)
        if sharded is not None:
            sharded.begin_eval()
        try:
            return runner.evaluate(model, batch, sums)
        finally:
            if sharded is not None:
                sharded.end_eval()

    def close(self) -> None:
        self._runner = None  # drops its transport's process groups (see ProcessGroups.destroy)


def comm_device(device: torch.device) -> torch.device:
    """Where collectives of host-side scalars run: the GPU under NCCL, else the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def global_stats(stats: StepStats, groups: ProcessGroups | None, dims: ParallelDims, last_stage: bool,
                 device: torch.device) -> StepStats:
    """Loss and tokens summed over data parallelism (loss from the last stage); compute-time imbalance."""
    dev = comm_device(device)
    dp_group = groups.dp if groups is not None and dims.dp > 1 else None
    pp_group = groups.pp if groups is not None and dims.pp > 1 else None
    loss_sum, tokens, compute_sum = all_reduce_scalars([stats.loss_sum, float(stats.tokens), stats.compute_s],
                                                       dp_group, dev)
    (stats.global_loss_sum,) = all_reduce_scalars([loss_sum if last_stage else 0.0], pp_group, dev)
    stats.global_tokens = int(tokens)
    if dp_group is not None:
        (slowest,) = all_reduce_scalars([stats.compute_s], dp_group, dev, op=dist.ReduceOp.MAX)
        stats.dp_imbalance = slowest / max(compute_sum / dims.dp, 1e-12)
    return stats


def compare_plans(plan: PipelinePlan, rank: int, group, group_ranks: list[int], step: int) -> None:
    """Raise ``PlanDivergence`` unless every rank of ``group`` (one replica, stage order) holds ``plan``."""
    mine = (plan.fingerprint(), plan.chunk_tokens)
    every: list = [None] * len(group_ranks)
    dist.all_gather_object(every, mine, group=group)
    ref_rank, (ref_fp, ref_tokens) = group_ranks[0], every[0]
    for r, (fp, tokens) in zip(group_ranks, every):
        if fp == ref_fp:
            continue
        if tokens != ref_tokens:
            c = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), min(len(tokens),
                                                                                       len(ref_tokens)))
            a = tokens[c] if c < len(tokens) else "no chunk"
            b = ref_tokens[c] if c < len(ref_tokens) else "no chunk"
            detail = f"chunk {c} has {a} tokens on rank {r} but {b} on rank {ref_rank}"
        else:
            detail = "same chunks, different action lists (planner inputs or code differ)"
        raise PlanDivergence(f"rank {rank}, step {step}: the pipeline plan of rank {r} (fingerprint {fp}) differs "
                             f"from rank {ref_rank}'s ({ref_fp}): {detail}")
