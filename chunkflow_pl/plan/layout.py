"""The layout planner: for a cluster of ``devices`` cards of ``device_memory`` each, the fastest simulated step that
fits, over pipeline stages x data-parallel replicas x shards, gradient reduce, layer checkpointing, chunk size and k
(and split backward, where ``PlanSpec.split_backward`` lists it).

Pure (lengths and typed settings in; no torch). For every candidate the runtime accepts (``ParallelConfig``
refuses what it cannot run: ``reshard_after_forward=true``, ``every_backward`` with pp > 1):

* **memory per rank**: ``core.stage_peaks`` with the layout's ``Sharding`` and ``chunk.layer_checkpoint``
  (``model.memory``: shards of the model state, the gathered compute copy, the unsharded gradient, activations
  under the stage's live-chunk cap, K/V state of the data's longest sequence), the largest stage, plus
  ``overhead``; it fits when that is at most ``device_memory``.
* **step time**: each sampled global batch split over the ``dp`` replicas (``data.balance``), each replica's
  share planned by the scheduler over ``pp`` stages and run by the simulator (FLOPs at ``flops_per_s``;
  pipeline messages at the bandwidth of the link between neighbouring stages; ``layer_checkpoint=full`` makes a
  backward cost one more forward), then FSDP2's collectives added (``schedule.cost.FsdpComm``: not overlapped
  with compute in this runtime). The slowest replica, averaged over the batches; the bubble is that replica's
  idle share of its stages. Split backward (pp > 1 only; one device has nothing to fill) changes the plan, not
  the memory prediction: a chunk waiting for its ``W`` keeps its slot under the same cap.

Pick: the fastest that fits; within 1% of it, the smallest peak, then unsplit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.memory import Sharding, precision_bytes, stage_params
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.plan.core import TIE, PlanSpec, stage_peaks, worst_case
from chunkflow_pl.schedule.cost import CostModel, FsdpComm, Links
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.scheduler import plan_pipeline
from chunkflow_pl.schedule.simulator import simulate

LAYER_CHECKPOINTS = ("none", "full")


@dataclass(frozen=True)
class ClusterSpec:
    """The cards to plan for and how they are linked."""

    devices: int
    device_memory: int  # bytes per card
    links: Links = Links()
    max_pp: int | None = None  # None: up to the model's layers

    def __post_init__(self) -> None:
        if self.devices < 1 or self.device_memory < 1:
            raise ValueError(f"plan.devices={self.devices} and plan.device_memory={self.device_memory} must be >= 1")


@dataclass(frozen=True)
class Layout:
    pp: int
    dp_replicate: int
    dp_shard: int
    grad_reduce: str
    layer_checkpoint: str
    chunk_size: int
    k: int
    split_backward: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def override(self) -> str:
        return (f"parallel.pp={self.pp} parallel.dp_replicate={self.dp_replicate} parallel.dp_shard={self.dp_shard} "
                f"parallel.grad_reduce={self.grad_reduce} parallel.reshard_after_forward=false "
                f"chunk.layer_checkpoint={self.layer_checkpoint} chunk.size={self.chunk_size} chunk.k={self.k}"
                + (" parallel.split_backward=true" if self.split_backward else ""))


@dataclass(frozen=True)
class LayoutRow:
    layout: Layout
    peak: int  # bytes, the largest stage's rank, without overhead
    compute_time: float  # seconds, simulated chunk actions (pipeline included); NaN when it does not fit
    comm_time: float  # seconds, FSDP2's collectives
    bubble: float  # idle share of the slowest replica's stages
    fits: bool

    @property
    def step_time(self) -> float:
        return self.compute_time + self.comm_time


@dataclass
class LayoutResult:
    rows: list[LayoutRow]
    best: LayoutRow | None
    cluster: ClusterSpec
    max_len: int

    def override(self) -> str:
        return "" if self.best is None else self.best.layout.override()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _runnable(pp: int, dp_replicate: int, dp_shard: int, grad_reduce: str) -> bool:
    """Whether the runtime accepts the layout (its own checks, so the planner never prints one it refuses)."""
    try:
        ParallelConfig(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, grad_reduce=grad_reduce)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Sim:
    compute: float
    bubble: float
    passes: int  # chunk actions (forward, recompute, backward) of the busiest rank's stage
    backwards: int  # chunks of a rank, padding included (every_backward reduces that often)


def _simulate(cfg: ModelConfig, spec: PlanSpec, cluster: ClusterSpec, pp: int, dp: int, chunk_size: int, k: int,
              layer_checkpoint: str, sample: Sequence[Sequence[int]], split_backward: bool = False) -> _Sim:
    _, ab = precision_bytes(spec.precision)
    # neighbouring stages are dp ranks apart: one node only if the whole pipeline of replicas fits on one
    link = cluster.links.bytes_per_s(pp * dp)
    cost = CostModel.from_model(cfg, pp, flops_per_s=spec.flops_per_s, act_bytes=ab, link_bytes_per_s=link,
                                backward=3.0 if layer_checkpoint == "full" else 2.0)
    compute = bubble = 0.0
    passes = backwards = 0
    batches = [b for b in sample if len(b)]
    for lens in batches:
        plan = build_chunk_plan(lens, chunk_size)
        assignment = assign_to_ranks(plan, dp, cost.balance_cost())
        slowest = None
        chunks_per_rank = max(len(mine) for mine in assignment.per_rank)
        for mine in assignment.per_rank:
            if not mine:
                continue
            chunks = [plan.chunks[c] for c in mine]
            sim = simulate(plan_pipeline(chunks, lens, pp, k, cost=cost, split_backward=split_backward), chunks, lens,
                           cost)
            if slowest is None or sim.step_time > slowest.step_time:
                slowest = sim
        compute += slowest.step_time
        bubble += slowest.bubble_total
        passes = max(passes, max(sum(1 for e in slowest.events if e.stage == s and e.op in
                                     (Op.FORWARD.value, Op.RECOMPUTE.value, Op.BACKWARD.value)) for s in range(pp)))
        backwards = max(backwards, chunks_per_rank)
    n = len(batches)
    return _Sim(compute / n, bubble / n, passes, backwards)


def plan_layout(cfg: ModelConfig, spec: PlanSpec, cluster: ClusterSpec, sample: Sequence[Sequence[int]],
                epoch: Sequence[Sequence[int]] | None = None,
                layer_checkpoints: Sequence[str] = LAYER_CHECKPOINTS) -> LayoutResult:
    """Every runnable layout of ``cluster.devices`` cards x candidate (chunk size, k, layer checkpointing), its
    predicted peak and step time; ``spec`` gives precision, optimizer, candidates and rates (its pp/dp unused)."""
    epoch = sample if epoch is None else epoch
    if not sample or not any(len(b) for b in sample):
        raise ValueError("the planner needs at least one non-empty global batch of sequence lengths")
    max_len = max(max(b) for b in epoch if len(b))
    wb, ab = precision_bytes(spec.precision)
    sizes = spec.chunk_sizes or tuple(c for c in (2048, 4096, 8192, 16384, 32768) if c < 2 * max_len)
    max_pp = min(cfg.num_layers, cluster.max_pp or cfg.num_layers)
    rows: list[LayoutRow] = []
    for pp in [p for p in _divisors(cluster.devices) if p <= max_pp]:
        dp = cluster.devices // pp
        stages = split_stages(cfg.num_layers, pp)
        biggest = max(stages, key=lambda s: stage_params(cfg, s))
        params = stage_params(cfg, biggest)
        for c in sizes:
            chain = max(1, math.ceil(max_len / c))
            largest, state = worst_case(epoch, c)
            if max_len > c:
                state = max(state, max_len)
            ks = sorted({min(chain if k == "chain" else int(k), chain) for k in spec.ks})
            splits = sorted(set(spec.split_backward)) if pp > 1 else [False]
            for k, lc, split in ((k, lc, split) for k in ks for lc in layer_checkpoints for split in splits):
                sim = None  # simulated once per (pp, c, k, lc, split), shared by the sharding variants
                for dp_shard in _divisors(dp):
                    for gr in ("last_backward", "every_backward"):
                        if not _runnable(pp, dp // dp_shard, dp_shard, gr):
                            continue
                        sharding = Sharding(dp_shard, dp // dp_shard, gr)
                        peaks = stage_peaks(cfg, replace(spec, pp=pp, dp=dp), min(largest, c), k, state, chain,
                                            sharding=sharding, layer_checkpoint=lc)
                        layout = Layout(pp, dp // dp_shard, dp_shard, gr, lc, c, k, split)
                        if max(peaks) + spec.overhead > cluster.device_memory:  # not simulated: it cannot run
                            rows.append(LayoutRow(layout, max(peaks), math.nan, math.nan, math.nan, False))
                            continue
                        if sim is None:
                            sim = _simulate(cfg, spec, cluster, pp, dp, c, k, lc, sample, split)
                        comm = FsdpComm(params, params, ab, wb, dp_shard, dp // dp_shard, gr) if dp > 1 else None
                        t = comm.step_time(cluster.links, sim.passes, sim.backwards) if comm else 0.0
                        rows.append(LayoutRow(layout, max(peaks), sim.compute, t, sim.bubble, True))
    return LayoutResult(rows=rows, best=pick(rows), cluster=cluster, max_len=max_len)


def pick(rows: Sequence[LayoutRow]) -> LayoutRow | None:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None
    fastest = min(r.step_time for r in fitting)
    return min((r for r in fitting if r.step_time <= fastest * (1 + TIE)),
               key=lambda r: (r.peak, r.layout.split_backward, r.step_time))
