"""One rank's step: the step plan of its replica, run on its stage. The one step path of every layout.

A step of one rank (one pipeline stage of one data-parallel replica; one device is ``pp = 1``)::

    plan     plan_step: the replica's PipelinePlan for the StepBatch. Every rank of the replica derives
             the same one: the cost model that orders the interleaving comes from the model config
             alone (pipeline_cost), never from local timings. Checked (check_pipeline_plan) unless
             check_plan=False. With one stage it has no messages: Algorithm 2's single-device order.
    begin    transport.begin_step: P2PTransport learns the step's messages and posts its first
             receives; a one-stage plan runs on a LocalTransport that nothing goes through
    run      one ChunkExecutor runs plan.stages[stage]; gradients accumulate in the model's .grad (with
             split_backward, a chunk's linear weight gradients at its W action, after its B)
    caps     the executor's measured peak of live activations must not pass plan.caps[stage]
    record   (record=True) every action timed from the replica's common origin: one StageTimeline

Virtual stages (``virtual > 1``): the rank holds blocks ``stage, stage + pp, ...`` (``model.stage`` is a
``RankBlocks``), each with its own ``ChunkExecutor`` (its own state store: key/value state never leaves its
block) and its own transport (``transport`` maps block -> transport: a channel per block pair and direction).
The rank runs ``plan.rank_actions(stage)``, each action on its block's executor; caps are checked per block::

    rank 0 of pp=2, v=2     (0, <..>) (0, F3) (0, >A3) (2, <A3) (2, F3) (2, >A3) ... (2, B3) (2, >G3) (0, <G3) ...
                            block 0's executor ----------  block 2's executor --------------------

``evaluate`` is the same path forward-only (validation): the replica's forward-only plan
(``schedule/evaluation.py``), no backward, no recompute, caps 0, the per-token losses summed by position.

Callers: the strategy (``strategy/step.py``, every layout), the exactness probe, the throughput
callback (which chunks the plan recomputed) and the benchmarks. Layout-specific work stays with the
caller through two hooks: ``on_plan`` (the strategy compares plan fingerprints across the replica)
and ``time_origin`` (on recorded steps, the strategy's barrier that gives the stages one clock origin).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from chunkflow_pl.config import check_virtual_stages
from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.evaluation import EvalSums, plan_forward
from chunkflow_pl.schedule.executor import ChunkExecutor, StepStats
from chunkflow_pl.schedule.pipeline_actions import Comm, Op, PipelinePlan
from chunkflow_pl.schedule.pipeline_checker import check_pipeline_plan
from chunkflow_pl.schedule.scheduler import plan_pipeline
from chunkflow_pl.schedule.transport import LocalTransport, Transport


def pipeline_cost(cfg: ModelConfig, pp: int, virtual: int = 1) -> CostModel:
    """The cost model every rank plans with: FLOPs of each stage's layers (as ``split_stages`` cuts them); with
    virtual stages one stage per block (``pp x virtual``)."""
    blocks = pp * virtual
    return CostModel.from_model(cfg, blocks,
                                stage_layers=[len(s.layer_ids) for s in split_stages(cfg.num_layers, blocks)])


def plan_step(batch: StepBatch, cost: CostModel, k: int, check: bool = True, virtual: int = 1,
              split_backward: bool = False) -> PipelinePlan:
    """The replica's plan for ``batch`` (``cost.pp`` stages, ``k`` kept chunks per chain), checked if ``check``;
    ``split_backward``: backwards split into B and W actions (``parallel.split_backward``).

    The check (``check_pipeline_plan``: dependencies, channel order, caps, progress under NCCL's
    matching rules) costs 0.4-1.3x the planning time: 7-50 ms per step for a 7B pipeline on a global
    batch of 256 sequences (``benchmarks/pipeline_measured.py --planning-only``), about 1% of such a
    step on GPUs; ``parallel.check_plan=false`` skips it.
    """
    chunks = [c.segments for c in batch.chunks]
    if virtual == 1:
        plan = plan_pipeline(chunks, batch.seq_lens, cost.pp, k, cost=cost, split_backward=split_backward)
    else:  # cost.pp counts blocks
        plan = plan_pipeline(chunks, batch.seq_lens, cost.pp // virtual, k, cost=cost, virtual=virtual,
                             split_backward=split_backward)
    if check:
        check_pipeline_plan(plan, chunks, batch.seq_lens, sends="async")  # with virtual stages: per block
    return plan


def forward_plan(chunks, pp: int, virtual: int = 1) -> PipelinePlan:
    """The forward-only plan (``plan_forward``); with virtual stages over ``pp x virtual`` blocks, each rank running
    its blocks chunk by chunk (chunk ``c`` through its blocks in ascending order before chunk ``c + 1``). That
    cannot deadlock: the first unfinished (chunk, block) in that order always has its input sent (its
    predecessor block comes earlier) and its rank has nothing earlier left to run."""
    plan = plan_forward(chunks, pp * virtual)
    if virtual == 1:
        return plan
    order = []
    for r in range(pp):
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for b in range(r, pp * virtual, pp):
            for i, a in enumerate(plan.stages[b]):
                by_chunk.setdefault(a.chunk, []).append((b, i))
        order.append(tuple(x for c in sorted(by_chunk) for x in by_chunk[c]))
    return PipelinePlan(plan.stages, plan.caps, plan.chunk_tokens, virtual=virtual, order=tuple(order))


@dataclass
class StageTimeline:
    """What one rank ran in a recorded step: every action, in seconds from the replica's common start."""

    rank: int
    stage: int
    dp_rank: int
    step: int
    # (op, chunk, start, end); ops are Op / CommOp values. With virtual stages (op, chunk, start, end, block).
    events: list[tuple]
    peak_live: int  # most chunks holding activations at once, measured by the executor (all the rank's blocks)
    cap: int  # the plan's cap for this stage (k with one stage; with virtual stages its blocks' caps summed)
    plan_text: str = ""  # the replica's plan (PipelinePlan.text()), for the record
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StepRun:
    """What one rank's step gave: its stats (this rank only), the replica's plan, and the record if asked."""

    stats: StepStats
    plan: PipelinePlan
    stage: int
    timeline: StageTimeline | None = None

    @property
    def recomputed(self) -> list[int]:
        """Chunks this rank's stage recomputed (their dropped forward ran twice), in plan order."""
        return [a.chunk for a in self.plan.compute(self.stage) if a.op is Op.RECOMPUTE]


class StepRunner:
    """Runs steps of stage ``stage`` of a ``pp``-stage replica of a model shaped like ``cfg``.

    ``k``: chunks per chain whose activations are kept (``chunk.k``). ``transport``: the link to the
    neighbouring stages (required when ``pp > 1``; one stage gets a ``LocalTransport``).
    ``virtual`` (``parallel.virtual_stages``): blocks per rank; then ``stage`` is the pipeline rank, the model
    holds its blocks (``RankBlocks``) and ``transport`` maps each of its blocks to that block's transport.
    ``rank``/``dp_rank`` only label the timelines. The cost model is built once, here. ``split_backward``
    (``parallel.split_backward``): plans split each backward into B and W; the model's decoder layers must have
    ``SplitLinear`` layers (``model/split_linear.apply_split_linear``; the executor refuses the plan otherwise).
    """

    def __init__(self, cfg: ModelConfig, k: int, device: torch.device | str, *, stage: int = 0, pp: int = 1,
                 offload_state: bool = False, transport: Transport | Mapping[int, Transport] | None = None,
                 check_plan: bool = True, rank: int = 0, dp_rank: int = 0, virtual: int = 1,
                 split_backward: bool = False) -> None:
        if k < 1:
            raise ValueError(f"chunk.k={k} must be >= 1 (chunks whose activations are kept)")
        if not 0 <= stage < pp:
            raise ValueError(f"stage {stage} is not one of the pipeline's {pp} stages")
        if pp > 1 and transport is None:
            raise ValueError("a pipeline stage (pp > 1) needs a transport to its neighbouring stages")
        check_virtual_stages(virtual, pp)
        self.k, self.stage, self.pp, self.virtual = int(k), int(stage), int(pp), int(virtual)
        self.blocks = tuple(range(self.stage, self.pp * self.virtual, self.pp))  # (stage,) without virtual stages
        if self.virtual > 1:
            if not isinstance(transport, Mapping) or sorted(transport) != list(self.blocks):
                raise ValueError(f"virtual stages: transport must map each block of rank {self.stage} "
                                 f"{self.blocks} to its transport (strategy.p2p.open_block_transports)")
            self.transports: dict[int, Transport] = dict(transport)
        else:
            if isinstance(transport, Mapping):
                raise ValueError("a transport per block is for virtual stages (virtual > 1)")
            self.transports = {self.stage: transport if transport is not None else LocalTransport()}
        self.transport: Transport = self.transports[self.stage]
        self.device = torch.device(device)
        self.offload_state = bool(offload_state)
        self.check_plan = bool(check_plan)
        self.split_backward = bool(split_backward)
        self.rank, self.dp_rank = int(rank), int(dp_rank)
        self.cost = pipeline_cost(cfg, self.pp, self.virtual)

    def plan(self, batch: StepBatch) -> PipelinePlan:
        """The replica's plan for ``batch`` (what ``run`` executes; deterministic, so it may be derived again)."""
        return plan_step(batch, self.cost, self.k, check=self.check_plan, virtual=self.virtual,
                         split_backward=self.split_backward)

    def run(self, model: torch.nn.Module, batch: StepBatch, *, should_stop: Callable[[], bool] | None = None,
            record: bool = False, on_plan: Callable[[PipelinePlan], None] | None = None,
            time_origin: Callable[[], None] | None = None,
            after_backward: Callable[[], None] | None = None) -> StepRun:
        """Forward/backward of this stage's actions for ``batch`` on ``model`` (this stage's layers).

        ``should_stop`` is polled between actions (``StepInterrupted``). ``on_plan(plan)`` runs before any
        message moves; ``time_origin()`` runs right before the first action of a recorded step;
        ``after_backward()`` after every backward action (``ChunkExecutor``).
        Raises ``RuntimeError`` when the stage held more live activations than its cap (a runtime bug).
        """
        plan = self.plan(batch)
        if on_plan is not None:
            on_plan(plan)
        self._check_virtual(plan)
        for t in self.transports.values():
            t.begin_step(batch.step_index, plan.stages, model.cfg.hidden_size, next(model.parameters()).dtype)
        if record and time_origin is not None:
            time_origin()
        clock = device_clock(self.device) if record else None
        exs = {b: ChunkExecutor(self._part(model, b), batch, self.device, offload_state=self.offload_state,
                                transport=self.transports[b], should_stop=should_stop, clock=clock,
                                after_backward=after_backward) for b in self.blocks}
        t0 = time.perf_counter()
        if self.virtual == 1:
            stats = exs[self.stage].run(plan.stages[self.stage])
            events = exs[self.stage].events
        else:
            stats, events = self._run_blocks(plan, exs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        stats.compute_s = time.perf_counter() - t0  # message waits included: this rank's time in the plan
        for b, ex in exs.items():
            cap = plan.caps[b]
            if ex.stats.max_live_activations > cap:
                what = f"stage {b}" if self.virtual == 1 else f"block {b}"
                raise RuntimeError(f"rank {self.rank}, {what}: {ex.stats.max_live_activations} chunks held "
                                   f"activations at once, above the plan's cap {cap} (a runtime bug)")
        timeline = None
        if record:
            cap = sum(plan.caps[b] for b in self.blocks)
            timeline = StageTimeline(self.rank, self.stage, self.dp_rank, batch.step_index, events,
                                     stats.max_live_activations, cap, plan.text(),
                                     {"plan": plan, "blocks": list(self.blocks)})
        return StepRun(stats, plan, self.stage, timeline)

    def _part(self, model: torch.nn.Module, block: int):
        """What block ``block``'s executor runs: the model itself, or its block view (virtual stages)."""
        return model if self.virtual == 1 else model.block(block)

    def _check_virtual(self, plan: PipelinePlan) -> None:
        """The plan fits this runner's layout (ranks x virtual stages). That each rank's order runs its blocks'
        lists whole and in order is ``check_pipeline_plan``'s ``check_rank_order``, run by ``plan_step``."""
        if plan.virtual != self.virtual or plan.ranks != self.pp:
            raise ValueError(f"rank {self.rank}: the plan has {plan.ranks} ranks x {plan.virtual} virtual stages, "
                             f"the runner {self.pp} x {self.virtual}")

    def _run_blocks(self, plan: PipelinePlan, exs: dict[int, ChunkExecutor]) -> tuple[StepStats, list[tuple]]:
        """This rank's actions in ``plan.order``, each on its block's executor; the rank's stats and events."""
        live = 0
        for b, a in plan.rank_actions(self.stage):
            ex = exs.get(b)
            if ex is None:
                raise RuntimeError(f"rank {self.rank}: the plan orders {a} of block {b}, which is not one of its "
                                   f"blocks {self.blocks}")
            n = len(ex.events)
            ex.act(a)
            if not isinstance(a, Comm):
                live = max(live, sum(e.live_chunks for e in exs.values()))
            if ex.clock is not None:
                ex.events[n:] = [(*e, b) for e in ex.events[n:]]
        per_block = {b: ex.finish() for b, ex in exs.items()}
        first = per_block[self.blocks[0]]
        stats = StepStats(
            loss_sum=sum(s.loss_sum for s in per_block.values()),  # only the block with the head has any
            tokens=first.tokens, chunks=first.chunks,  # every block runs every chunk: count them once
            recomputed_chunks=first.recomputed_chunks,
            peak_state_bytes=sum(s.peak_state_bytes for s in per_block.values()),  # the stores coexist
            max_live_activations=live)
        events = sorted((e for ex in exs.values() for e in ex.events), key=lambda e: e[2])
        return stats, events


    def evaluate(self, model: torch.nn.Module, batch: StepBatch, sums: EvalSums) -> StepRun:
        """Forward-only step of this stage for ``batch`` (validation): the last stage adds every supervised token's
        cross-entropy to ``sums`` by position. Nothing is kept for backward and no gradient is touched; each
        sequence's K/V state is freed after its last chunk. Runs outside inference mode (under ``no_grad``), so
        what it caches (the RoPE table) stays usable by training."""
        plan = forward_plan([c.segments for c in batch.chunks], self.pp, self.virtual)
        with torch.inference_mode(False), torch.no_grad():
            for t in self.transports.values():
                t.begin_step(batch.step_index, plan.stages, model.cfg.hidden_size, next(model.parameters()).dtype)
            exs = {b: ChunkExecutor(self._part(model, b), batch, self.device, offload_state=self.offload_state,
                                    transport=self.transports[b], evaluation=sums) for b in self.blocks}
            t0 = time.perf_counter()
            if self.virtual == 1:
                stats = exs[self.stage].run(plan.stages[self.stage])
            else:
                stats, _ = self._run_blocks(plan, exs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stats.compute_s = time.perf_counter() - t0
        if stats.max_live_activations > 0:
            raise RuntimeError(f"rank {self.rank}, stage {self.stage}: a forward-only step kept activations")
        return StepRun(stats, plan, self.stage)


def device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds since now; on CUDA each reading waits for the device (recorded steps only)."""
    t0 = time.perf_counter()
    if device.type == "cuda":

        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        return clock
    return lambda: time.perf_counter() - t0
