"""One rank's part of a pipelined step: the replica's plan, its check, and the record of what ran.

Every rank of a replica (the ``pp`` stages holding the same data-parallel share) calls
``plan_step`` on the same ``StepBatch`` with the same model config and gets the same
``PipelinePlan``: the cost model that orders the interleaving comes from the config alone
(``CostModel.from_model``), never from local timings, which differ per rank. The rank then runs
``plan.stages[its stage]`` on its ``ChunkExecutor`` with a ``P2PTransport``.

Debug (``parallel.check_messages``): ``compare_plans`` gathers the plan fingerprint and the chunk
sizes from the replica's ranks before any message moves and names the first rank and chunk that
differ, instead of letting mismatched lists hang.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.pipeline_actions import PipelinePlan
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
from chunkflow_pl.schedule.pipeline_planner import plan_pipeline


class PlanDivergence(RuntimeError):
    """Ranks of one pipeline replica built different plans for the same step."""


def pipeline_cost(cfg: ModelConfig, pp: int) -> CostModel:
    """The cost model every rank plans with: FLOPs of each stage's layers (as ``split_stages`` cuts them)."""
    return CostModel.from_model(cfg, pp, stage_layers=[len(s.layer_ids) for s in split_stages(cfg.num_layers, pp)])


def plan_step(batch: StepBatch, cost: CostModel, k: int, check: bool = True) -> PipelinePlan:
    """The replica's plan for ``batch`` (``cost.pp`` stages, ``k`` kept chunks per chain), checked if ``check``.

    The check (``check_pipeline_plan``: dependencies, channel order, caps, progress under NCCL's
    matching rules) costs 0.4-1.3x the planning time: 7-50 ms per step for a 7B pipeline on a global
    batch of 256 sequences (``benchmarks/pipeline_measured.py --planning-only``), about 1% of such a
    step on GPUs; ``parallel.check_plan=false`` skips it.
    """
    chunks = [c.segments for c in batch.chunks]
    plan = plan_pipeline(chunks, batch.seq_lens, cost.pp, k, cost=cost)
    if check:
        check_pipeline_plan(plan, chunks, batch.seq_lens, sends="async")
    return plan


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


@dataclass
class StageTimeline:
    """What one rank ran in a recorded step: every action, in seconds from the replica's common start."""

    rank: int
    stage: int
    dp_rank: int
    step: int
    events: list[tuple[str, int, float, float]]  # (op, chunk, start, end); ops are Op / CommOp values
    peak_live: int  # most chunks holding activations at once, measured by the executor
    cap: int | None  # the plan's cap for this stage (None with one stage)
    plan_text: str = ""  # the replica's plan (PipelinePlan.text()), for the record
    extra: dict = field(default_factory=dict)
