"""Cost model of pipeline actions: how long a compute action or a message takes, per stage.

A chunk's forward on stage ``s`` costs ``per_token[s] * tokens + per_pair[s] * attention pairs``
(``data.balance.chunk_cost``: a segment ``[start, end)`` attends to its prefix, so its pairs grow with
``start``); backward costs ``backward`` times that, recompute ``recompute`` times. A message of ``T``
tokens costs ``comm_latency + comm_per_token * T`` and does not occupy either stage (sends are
asynchronous). The data-parallel balance weighs chunks with the same forward terms (``balance_cost``).
``from_model`` derives the terms from a ``ModelConfig``'s FLOPs (``model/flops.py``)::

    per layer, forward:  linear 2 * (2 D^2 + 2 D Dkv + 3 D F) FLOPs per token     (q, o; k, v; MLP)
                         attention 4 D FLOPs per causal (query, key) pair           (q.k and p.v)
    last stage also:     head 2 V D FLOPs per token

A dropped forward (``keep=False``) on the last stage runs for its keys/values only (the executor's
``kv_only``, ``model/decoder.py``): its last layer stops after the k/v projections, so it costs the
``drop_last_per_token`` / ``drop_last_per_pair`` terms instead::

    last stage of n layers, dropped:   (n - 1) full layers + k, v of layer n   2 * 2 D Dkv per token
                                       (n - 1) layers' attention pairs         (none in layer n)
                                       no head

Middle stages must send their output, so a dropped forward there is a full one; recomputes and
backwards are full on every stage. ``uniform`` (no model to count) leaves both terms ``None``: a
dropped forward costs a kept one unless they are passed.

Split backward (``Action.split``, zero-bubble schedules): the backward of a matrix product ``Y = X W``
is two products of the forward's size, ``dX = dY W^T`` (input gradient) and ``dW = X^T dY`` (weight
gradient); attention has no weights, so its whole backward is input (and key/value state) gradient.
``per_token`` is the linear layers (and the LM head on the last stage), so the halves cost::

    WEIGHT(c)            per_token[s] * tokens                          the weight-gradient products
    BACKWARD(c, split)   backward * forward - WEIGHT(c)                 the rest: input-gradient products,
                                                                        all of attention's backward

``B(in) + W`` is the unsplit backward (up to rounding). With ``backward = 2``, ``B(in)`` is
``per_token * tokens + 2 * per_pair * pairs``; a larger ``backward`` (e.g. 3 under full layer
checkpointing: one more forward) lands in ``B(in)``, which recomputes what ``W`` reads. Long chunks are
attention-heavy, so their ``W`` is the smaller half.

Every rank must build the model from the same numbers: the scheduler's order depends on it, so a cost
measured per rank (different on each) would give each rank a different plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from chunkflow_pl.data.balance import DEFAULT_A_ATTN, ChunkCost, chunk_cost
from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.flops import ModelFlops
from chunkflow_pl.schedule.pipeline_actions import Action, Op

# Defaults for from_model: the ratio of message time to compute time is all they set.
DEFAULT_FLOPS_PER_S = 400e12  # ~40% of an H100's dense bf16 peak
DEFAULT_LINK_BYTES_PER_S = 50e9  # ~400 Gb/s between nodes
DEFAULT_LATENCY_S = 20e-6


class ActionCost(Protocol):
    """What the scheduler and the simulator ask of a cost model."""

    @property
    def pp(self) -> int: ...

    def op_time(self, op: Op, stage: int, chunk: int, segments: Sequence[Segment], keep: bool = True,
                split: bool = False) -> float:
        """Seconds of ``op``; ``keep`` is the FORWARD action's (False: a dropped forward), ``split`` the
        BACKWARD action's (True: input and state gradients only, the WEIGHT action does the rest).

        Callers pass ``split`` only when it is True (``action_time``), so a cost model written before
        split backward still times every plan without it."""
        ...

    def comm_time(self, tokens: int) -> float: ...


def action_time(cost: ActionCost, action: Action, stage: int, segments: Sequence[Segment]) -> float:
    """Seconds of ``action`` on ``stage``: ``cost.op_time`` asked with the action's own flags."""
    if action.split:
        return cost.op_time(action.op, stage, action.chunk, segments, action.keep, split=True)
    return cost.op_time(action.op, stage, action.chunk, segments, action.keep)


@dataclass(frozen=True)
class CostModel:
    per_token: tuple[float, ...]  # forward time per token, by stage
    per_pair: tuple[float, ...]  # forward time per causal (query, key) pair, by stage
    backward: float = 2.0  # backward = backward * forward
    recompute: float = 1.0  # recompute = recompute * forward
    comm_latency: float = 0.0  # per message
    comm_per_token: float = 0.0  # per token of a [T, D] message
    drop_last_per_token: float | None = None  # dropped forward on the last stage (kv_only); None: = per_token[-1]
    drop_last_per_pair: float | None = None  # the same per pair; None: = per_pair[-1]

    def __post_init__(self) -> None:
        if not self.per_token or len(self.per_token) != len(self.per_pair):
            raise ValueError(f"per_token ({len(self.per_token)}) and per_pair ({len(self.per_pair)}) "
                             "need one entry per stage")
        if min(self.per_token) <= 0 or min(self.per_pair) < 0:
            raise ValueError("per_token must be > 0 (every action takes time) and per_pair >= 0")
        if self.backward <= 0 or self.recompute <= 0 or self.comm_latency < 0 or self.comm_per_token < 0:
            raise ValueError("backward and recompute multipliers must be > 0, comm costs >= 0")
        if (self.drop_last_per_token is None) != (self.drop_last_per_pair is None):
            raise ValueError("drop_last_per_token and drop_last_per_pair go together (both None: a dropped "
                             "forward on the last stage costs a full one)")
        dt, dp = self.drop_last_per_token, self.drop_last_per_pair
        if dt is not None and not (0 < dt <= self.per_token[-1] and 0 <= dp <= self.per_pair[-1]):
            raise ValueError(f"drop_last_per_token {dt} / drop_last_per_pair {dp} must be > 0 / >= 0 and at most the "
                             f"last stage's per_token {self.per_token[-1]} / per_pair {self.per_pair[-1]} "
                             "(a dropped forward computes less than a kept one)")

    @property
    def pp(self) -> int:
        return len(self.per_token)

    def forward_time(self, stage: int, segments: Sequence[Segment], keep: bool = True) -> float:
        """A forward on ``stage``; ``keep=False``: a dropped one (cheaper on the last stage, see above)."""
        if not keep and stage == self.pp - 1 and self.drop_last_per_token is not None:
            return chunk_cost(segments, self.drop_last_per_token, self.drop_last_per_pair)
        return chunk_cost(segments, self.per_token[stage], self.per_pair[stage])

    def op_time(self, op: Op, stage: int, chunk: int, segments: Sequence[Segment], keep: bool = True,
                split: bool = False) -> float:
        if split and op is not Op.BACKWARD:
            raise ValueError(f"split=True for a {op.value}: only a backward splits")
        if op is Op.FORWARD:
            return self.forward_time(stage, segments, keep)
        if op is Op.WEIGHT or split:
            if self.backward < 1:
                raise ValueError(f"CostModel.backward={self.backward} < 1 cannot be split: a backward computes at "
                                 "least the weight-gradient products, one forward's linear FLOPs")
            weight = chunk_cost(segments, self.per_token[stage], 0.0)  # see the module docstring
            return weight if op is Op.WEIGHT else self.backward * self.forward_time(stage, segments) - weight
        # a recompute runs the whole stage with autograd (the loss too), whatever the forward skipped
        f = self.forward_time(stage, segments)
        return f * (self.backward if op is Op.BACKWARD else self.recompute)

    def comm_time(self, tokens: int) -> float:
        return self.comm_latency + self.comm_per_token * tokens

    def balance_cost(self) -> ChunkCost:
        """The data-parallel balancer's chunk cost: this model's forward terms per stage (``data.balance``).

        Backward and recompute multiply every chunk alike (a dropped chunk's recompute depends on the
        schedule), so the forward terms set the balance."""
        return ChunkCost(per_token=self.per_token, per_pair=self.per_pair)

    @classmethod
    def uniform(cls, pp: int, per_token: float = 1.0, per_pair: float = DEFAULT_A_ATTN, **kw: float) -> CostModel:
        """The same terms on every stage (default: the data layer's 7B-class token/pair ratio)."""
        return cls(per_token=(float(per_token),) * pp, per_pair=(float(per_pair),) * pp, **kw)

    @classmethod
    def from_model(
        cls,
        cfg: ModelConfig,
        pp: int,
        *,
        stage_layers: Sequence[int] | None = None,
        flops_per_s: float = DEFAULT_FLOPS_PER_S,
        link_bytes_per_s: float | None = DEFAULT_LINK_BYTES_PER_S,
        latency_s: float = DEFAULT_LATENCY_S,
        act_bytes: int = 2,
        backward: float = 2.0,
        recompute: float = 1.0,
    ) -> CostModel:
        """Seconds per action for ``cfg`` split into ``pp`` stages (``stage_layers``, default even).

        ``link_bytes_per_s=None`` makes messages free (then ``latency_s`` is ignored too).
        """
        layers = tuple(stage_layers) if stage_layers is not None else even_stage_layers(cfg.num_layers, pp)
        if len(layers) != pp or sum(layers) != cfg.num_layers or min(layers) < 1:
            raise ValueError(f"stage_layers {layers} must be {pp} counts >= 1 summing to {cfg.num_layers} layers")
        # the FLOP terms themselves live with the model (model/flops.py): one ModelFlops per stage
        stages = [ModelFlops.from_config(cfg, layers=n, head=s == pp - 1) for s, n in enumerate(layers)]
        per_token = tuple(st.per_token / flops_per_s for st in stages)
        per_pair = tuple(st.per_pair / flops_per_s for st in stages)
        last = stages[-1]  # kv_only: a dropped forward on the last stage
        drop = dict(drop_last_per_token=last.kv_only_per_token / flops_per_s,
                    drop_last_per_pair=last.kv_only_per_pair / flops_per_s)
        comm = {} if link_bytes_per_s is None else dict(
            comm_latency=latency_s, comm_per_token=cfg.hidden_size * act_bytes / link_bytes_per_s)
        return cls(per_token=per_token, per_pair=per_pair, backward=backward, recompute=recompute, **drop, **comm)


def even_stage_layers(num_layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage, as even as possible; the first stages take the extra ones (the last holds the head)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp={pp} must be between 1 and the number of layers ({num_layers})")
    q, r = divmod(num_layers, pp)
    return tuple(q + (1 if s < r else 0) for s in range(pp))


@dataclass(frozen=True)
class MeasuredCost:
    """Durations looked up per ``(stage, op, chunk)``, e.g. recorded in a real run, for re-simulation.

    Not for planning on several ranks unless every rank holds the same table.
    """

    durations: dict[tuple[int, Op, int], float]
    num_stages: int
    comm: float = 0.0  # per message

    @property
    def pp(self) -> int:
        return self.num_stages

    def op_time(self, op: Op, stage: int, chunk: int, segments: Sequence[Segment], keep: bool = True,
                split: bool = False) -> float:
        # keep and split are unused: a chunk runs one forward and one backward per stage, timed as they ran
        # (kv_only or not, split or not); a split backward's WEIGHT is its own (stage, Op.WEIGHT, chunk)
        try:
            return self.durations[(stage, op, chunk)]
        except KeyError:
            raise KeyError(f"no measured duration for {op.name} of chunk {chunk} on stage {stage}") from None

    def comm_time(self, tokens: int) -> float:
        return self.comm


# ---- FSDP2's collectives, priced from link bandwidths (the layout planner's) -------------------------------------

DEFAULT_INTRA_NODE_GBPS = 3200.0  # gigabits/s per GPU inside a node (NVLink-class; ~400 GB/s of ring bandwidth)
DEFAULT_INTER_NODE_GBPS = 400.0  # gigabits/s per GPU between nodes (one 400G NIC per GPU)


@dataclass(frozen=True)
class Links:
    """Per-GPU link bandwidths in gigabits per second (``plan.intra_node_gbps``, ``plan.inter_node_gbps``) and how
    many ranks share a node (``plan.devices_per_node``). A group whose ranks all sit on one node runs at the intra
    rate, any other at the inter rate (a ring is as fast as its slowest hop)."""

    devices_per_node: int = 8
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS
    latency_s: float = DEFAULT_LATENCY_S

    def bytes_per_s(self, contiguous_span: int) -> float:
        """Bandwidth of a group whose ranks lie within ``contiguous_span`` consecutive ranks, aligned to it (the
        layout is pipeline-major with ``dp_shard`` minor, ``strategy/dims.py``)."""
        one_node = contiguous_span <= self.devices_per_node and self.devices_per_node % contiguous_span == 0
        return (self.intra_node_gbps if one_node else self.inter_node_gbps) * 1e9 / 8

    def ring(self, nbytes: float, ranks: int, span: int, passes: float = 1.0) -> float:
        """Seconds of a ring all-gather / reduce-scatter (``passes=1``) or all-reduce (``passes=2``) of ``nbytes``
        (the whole unsharded tensor) over ``ranks`` ranks spread over ``span`` consecutive ranks."""
        if ranks <= 1:
            return 0.0
        return passes * ((ranks - 1) / ranks * nbytes / self.bytes_per_s(span) + (ranks - 1) * self.latency_s)


@dataclass(frozen=True)
class FsdpComm:
    """FSDP2's collectives in one step of one stage (``strategy/sharding.py``), issued at fixed points and not
    overlapped with compute in this runtime, so their time adds to the step's:

    * all-gather of the stage's parameters in the compute dtype over ``dp_shard``: once at step start
      (``reshard_after_forward=false``), or per unit per chunk pass when resharding (every forward, recompute
      and backward gathers again);
    * reduce-scatter of the stage's gradients in the reduce dtype over ``dp_shard`` and all-reduce of the shard
      over ``dp_replicate``: once per step (``last_backward``) or after every backward (``every_backward``).
    """

    stage_params: int
    trained_params: int
    compute_bytes: int  # per parameter gathered (bf16 under bf16-mixed)
    reduce_bytes: int  # per gradient reduced (fp32 under bf16-mixed)
    dp_shard: int
    dp_replicate: int
    grad_reduce: str = "last_backward"
    reshard_after_forward: bool = False

    def step_time(self, links: Links, chunk_passes: int, backwards: int) -> float:
        """Seconds of one step's collectives; ``chunk_passes``: forwards + recomputes + backwards of the rank's
        chunks (gathers when resharding), ``backwards``: its backward actions (padding chunks count as one)."""
        p, r = self.dp_shard, self.dp_replicate
        gather = links.ring(self.stage_params * self.compute_bytes, p, p)
        gathers = chunk_passes if self.reshard_after_forward else 1
        reduce = (links.ring(self.trained_params * self.reduce_bytes, p, p)
                  + links.ring(self.trained_params * self.reduce_bytes / p, r, p * r, passes=2.0))
        reduces = max(backwards, 1) if self.grad_reduce == "every_backward" else 1
        return gathers * gather + reduces * reduce
