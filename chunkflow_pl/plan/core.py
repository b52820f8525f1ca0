"""Predict peak memory and step time per ``(chunk.size, k, split backward)`` for a model and a length distribution.

Inputs are lengths and typed settings only (no Hydra, no weights, no data tokens). For every candidate:

* **peak memory**, per pipeline stage: ``model.memory.estimate_stage_memory`` with the worst case over
  every global batch of an epoch: the largest chunk, the key/value state of the split sequences alive
  at once (on one device: the chunk-graph component holding the most split-sequence tokens; never less
  than the longest sequence of the data), the stage's live-chunk cap (``k`` on one device, the 1F1B
  cap ``max(pp - s, k)`` in a pipeline) and, after the first stage, the boundary inputs of a chain's
  dropped chunks. The budget is compared with ``peak + overhead`` (what the runtime holds besides
  tensors: CUDA context, allocator slack, the Python process).
* **step time**: the chunk plan of each sampled global batch (Algorithm 1), split over data-parallel
  ranks (``data.balance``), planned by ``schedule.scheduler`` (``pp = 1``: the single-device
  plan) and run by ``schedule.simulator`` on ``CostModel.from_model`` (FLOPs at ``flops_per_s``;
  backward 2x, recompute 1x a forward); the slowest rank's time, averaged over the batches. FLOPs
  only: kernel efficiency per chunk size and per-chunk overheads are not modelled, so settings that
  differ only in packing predict the same time.
* **split backward** (``PlanSpec.split_backward``, candidates; default only ``False``): the scheduler's
  ``split_backward`` plans (``B(in)`` on the critical path, ``W`` where a stage would idle), priced by
  ``CostModel``'s FLOP split. Memory is the same prediction: a chunk waiting for its ``W`` keeps its
  slot, and the stage's live-chunk cap bounds the slots. Not planned on one device (``pp = 1``): there is
  no idle time to fill, ``W`` follows its ``B`` at once and the step takes the same time.

Recommendation: the fastest setting that fits the budget; among settings within 1% of it, the
largest chunk (fewer, larger kernels), then the smallest ``k`` (less memory), then unsplit (split
backward must buy more than 1%: its extra kernel launches are not modelled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from chunkflow_pl.data.balance import assign_to_ranks
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.memory import Sharding, estimate_stage_memory, precision_bytes
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.schedule.cost import CostModel
from chunkflow_pl.schedule.graph import build_graph
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline
from chunkflow_pl.schedule.simulator import simulate

TIE = 0.01  # step times within 1% count as equal


@dataclass(frozen=True)
class PlanSpec:
    """What the planner needs besides the model and the lengths."""

    memory_budget: int  # bytes per device
    precision: str = "32-true"
    optimizer: str = "adamw"
    loss_chunk: int = 4096
    pp: int = 1
    dp: int = 1
    chunk_sizes: tuple[int, ...] | None = None  # None: powers of two from 512 up to the longest sequence
    ks: tuple[int | str, ...] = (1, 2, 4, 8, "chain")  # "chain": k = chunks of the longest sequence
    flops_per_s: float = 400e12
    overhead: int = 0  # bytes the runtime holds besides the estimated tensors
    split_backward: tuple[bool, ...] = (False,)  # candidates: (False, True) also plans split backward

    def __post_init__(self) -> None:
        if self.pp < 1 or self.dp < 1:
            raise ValueError(f"parallel.pp={self.pp} and parallel.dp={self.dp} must be >= 1")
        for k in self.ks:
            if k != "chain" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"plan.ks entry {k!r}: expected an integer >= 1 or 'chain'")
        if self.chunk_sizes is not None and (not self.chunk_sizes or min(self.chunk_sizes) < 1):
            raise ValueError(f"plan.chunk_sizes={self.chunk_sizes} must be positive sizes")
        if not self.split_backward or any(not isinstance(b, bool) for b in self.split_backward):
            raise ValueError(f"split_backward candidates {self.split_backward!r}: expected a non-empty tuple of "
                             "booleans, e.g. (False, True)")


@dataclass(frozen=True)
class Row:
    chunk_size: int
    k: int
    chunks_per_batch: float  # mean over the sampled batches, all ranks
    recompute_share: float  # recompute time / compute time, summed over stages and batches
    step_time: float  # seconds, mean over the sampled batches
    tokens_per_s: float
    stage_peaks: tuple[int, ...]  # predicted peak bytes per pipeline stage
    fits: bool
    split_backward: bool = False

    @property
    def peak(self) -> int:
        return max(self.stage_peaks)


@dataclass
class PlanResult:
    rows: list[Row]
    best: Row | None
    spec: PlanSpec
    max_len: int
    sampled_batches: int
    notes: list[str] = field(default_factory=list)

    def override(self) -> str:
        if self.best is None:
            return ""
        split = " parallel.split_backward=true" if self.best.split_backward else ""
        return f"chunk.size={self.best.chunk_size} chunk.k={self.best.k}{split}"


def default_chunk_sizes(max_len: int) -> tuple[int, ...]:
    sizes, c = [], 512
    while True:
        sizes.append(c)
        if c >= max_len:
            return tuple(sizes)
        c *= 2


def _chain_len(max_len: int, chunk_size: int) -> int:
    return max(1, math.ceil(max_len / chunk_size))


def worst_case(batches: Sequence[Sequence[int]], chunk_size: int) -> tuple[int, int]:
    """Over all ``batches``: (largest chunk in tokens, most split-sequence tokens alive at once on one device)."""
    largest, state = 0, 0
    for lens in batches:
        plan = build_chunk_plan(lens, chunk_size)
        largest = max(largest, max((sum(s.length for s in c) for c in plan.chunks), default=0))
        if not plan.chains:
            continue
        graph = build_graph(plan.chunks, lens)
        alive: dict[int, int] = {}
        for seq, members in plan.chains.items():
            comp = graph.component_of[members[0]]
            alive[comp] = alive.get(comp, 0) + lens[seq]
        state = max(state, max(alive.values()))
    return largest, state


def stage_peaks(cfg: ModelConfig, spec: PlanSpec, chunk_tokens: int, k: int, state_tokens: int,
                chain_len: int, sharding: Sharding | None = None, layer_checkpoint: str = "none") -> tuple[int, ...]:
    """Predicted peak bytes of each pipeline stage's ranks for chunks of ``chunk_tokens`` and ``k`` kept chunks
    (``sharding``: the stage's data parallelism under FSDP2; None: unsharded)."""
    caps = default_caps(spec.pp, k)
    out = []
    for s, stage in enumerate(split_stages(cfg.num_layers, spec.pp)):
        live = min(caps[s], chain_len) if spec.pp == 1 else caps[s]
        boundary = 0 if s == 0 else max(0, chain_len - k) * chunk_tokens
        est = estimate_stage_memory(cfg, stage, chunk_tokens, live, spec.precision, spec.optimizer, spec.loss_chunk,
                                    state_tokens=state_tokens, boundary_tokens=boundary,
                                    layer_checkpoint=layer_checkpoint, sharding=sharding)
        out.append(est.total)
    return tuple(out)


def simulate_step(cfg: ModelConfig, spec: PlanSpec, cost: CostModel, lens: Sequence[int], chunk_size: int,
                  k: int, split_backward: bool = False) -> tuple[float, float, float, int]:
    """(step time, recompute time, compute time, chunks) of one global batch: the slowest dp rank."""
    plan = build_chunk_plan(lens, chunk_size)
    assignment = assign_to_ranks(plan, spec.dp, cost.balance_cost())  # the same cost model
    step = recompute = busy = 0.0
    for mine in assignment.per_rank:
        chunks = [plan.chunks[c] for c in mine]
        pplan = plan_pipeline(chunks, lens, spec.pp, k, cost=cost, split_backward=split_backward)
        sim = simulate(pplan, chunks, lens, cost)
        step = max(step, sim.step_time)
        busy += sum(sim.busy)
        recompute += sum(e.end - e.start for e in sim.events if e.op == Op.RECOMPUTE.value)
    return step, recompute, busy, len(plan.chunks)


def plan_chunking(cfg: ModelConfig, spec: PlanSpec, sample: Sequence[Sequence[int]],
                  epoch: Sequence[Sequence[int]] | None = None) -> PlanResult:
    """Predict every candidate ``(chunk.size, k)``; ``sample``: global batches (lengths) to time,
    ``epoch``: every global batch (for the memory worst case; default ``sample``)."""
    epoch = sample if epoch is None else epoch
    if not sample or not any(len(b) for b in sample):
        raise ValueError("the planner needs at least one non-empty global batch of sequence lengths")
    max_len = max(max(b) for b in epoch if len(b))
    _, ab = precision_bytes(spec.precision)
    cost = CostModel.from_model(cfg, spec.pp, flops_per_s=spec.flops_per_s, act_bytes=ab)
    tokens_per_batch = sum(sum(b) for b in sample) / len(sample)
    rows: list[Row] = []
    for c in spec.chunk_sizes or default_chunk_sizes(max_len):
        chain = _chain_len(max_len, c)
        largest, state = worst_case(epoch, c)
        if max_len > c:
            state = max(state, max_len)  # the longest sequence alone, whatever batch it lands in
        ks = sorted({min(chain if k == "chain" else int(k), chain) for k in spec.ks})
        for k in ks:
            peaks = stage_peaks(cfg, spec, min(largest, c), k, state, chain)  # split or not: the caps bound it
            for split in sorted(set(spec.split_backward)) if spec.pp > 1 else [False]:  # one device: no idle
                times = [simulate_step(cfg, spec, cost, b, c, k, split) for b in sample if len(b)]
                step = sum(t[0] for t in times) / len(times)
                busy = sum(t[2] for t in times)
                rows.append(Row(chunk_size=c, k=k, chunks_per_batch=sum(t[3] for t in times) / len(times),
                                recompute_share=sum(t[1] for t in times) / busy if busy else 0.0, step_time=step,
                                tokens_per_s=tokens_per_batch / step if step else 0.0, stage_peaks=peaks,
                                fits=max(peaks) + spec.overhead <= spec.memory_budget, split_backward=split))
    return PlanResult(rows=rows, best=recommend(rows), spec=spec, max_len=max_len, sampled_batches=len(sample))


def recommend(rows: Sequence[Row]) -> Row | None:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None
    fastest = min(r.step_time for r in fitting)
    near = [r for r in fitting if r.step_time <= fastest * (1 + TIE)]
    return max(near, key=lambda r: (r.chunk_size, -r.k, not r.split_backward))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _size(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_table(result: PlanResult) -> str:
    spec = result.spec
    per_stage = spec.pp > 1
    splits = True in spec.split_backward  # a column only when split backward is a candidate
    head = (f"{'chunk.size':>10} {'k':>3}{' split' if splits else ''} {'chunks/batch':>12} {'recompute':>9} "
            f"{'step s':>10} {'tokens/s':>10} {'peak GiB':>9}{'  per stage GiB' if per_stage else ''}  fits")
    lines = [head, "-" * len(head)]
    for r in result.rows:
        mark = "  <- recommended" if r is result.best else ""
        stages = "  " + " ".join(_gib(p) for p in r.stage_peaks) if per_stage else ""
        split = f" {'yes' if r.split_backward else 'no':>5}" if splits else ""
        lines.append(f"{_size(r.chunk_size):>10} {r.k:>3}{split} {r.chunks_per_batch:>12.1f} {r.recompute_share:>8.0%} "
                     f"{r.step_time:>10.4g} {r.tokens_per_s:>10.4g} {_gib(r.peak):>9}{stages}  "
                     f"{'yes' if r.fits else 'no'}{mark}")
    return "\n".join(lines)
