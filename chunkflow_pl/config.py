"""Typed ``chunk`` and ``parallel`` groups: the ChunkFlow and parallelism settings library code receives.

Both are built with the one typed ``from_dict`` (``chunkflow_pl.utils.typed_config``): unknown keys
and wrong types fail at start naming the key. This module imports no other layer, so data, schedule
and strategy code may all take these dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from chunkflow_pl.utils.sizes import parse_duration, parse_size
from chunkflow_pl.utils.typed_config import SIZE, from_dict

GRAD_REDUCE = ("last_backward", "every_backward")
GRAD_REDUCE_SETTINGS = (*GRAD_REDUCE, "auto")  # auto: picked per run by the memory check
LAYER_CHECKPOINT = ("none", "full")


@dataclass(frozen=True)
class ChunkConfig:
    """size: max tokens per chunk (sizes accept ``32k``); longer sequences become dependent chunks.
    k: chunks of one sequence whose activations are kept during forward; the rest are recomputed.
    offload_state: keep split sequences' key/value state in host memory (pinned on CUDA).
    layer_checkpoint: ``none`` or ``full`` (inside kept chunks, each decoder layer keeps only its input and
    recomputes the rest in backward)."""

    size: int = field(default=4096, metadata=SIZE)
    k: int = 1
    offload_state: bool = False
    layer_checkpoint: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_size(self.size, key="chunk.size"))
        if self.layer_checkpoint not in LAYER_CHECKPOINT:
            raise ValueError(f"chunk.layer_checkpoint={self.layer_checkpoint!r} must be one of "
                             f"{', '.join(LAYER_CHECKPOINT)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"chunk.k={self.k!r} must be an integer")
        if self.k < 1:
            raise ValueError(f"chunk.k={self.k} must be >= 1 (chunks of a sequence whose activations are kept)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkConfig:
        return from_dict(cls, d, "chunk")


@dataclass(frozen=True)
class ParallelConfig:
    """The layout: ``pp`` pipeline stages x data parallelism. dp x pp ranks in all (checked against the
    world size where the device mesh is built, not here).

    Data parallelism is ``dp_replicate`` x ``dp_shard`` ranks (``dp`` alone: ``dp`` replicas, the same as
    ``dp_replicate=dp``): parameters, gradients and optimizer state are sharded over ``dp_shard`` ranks
    (FSDP2) and replicated over ``dp_replicate`` groups of them (HSDP when both are > 1).
    grad_reduce: ``last_backward`` (gradients of a step accumulate unsharded, one reduce-scatter after the
    stage's last backward: fewest collectives) or ``every_backward`` (reduced after every chunk's backward,
    only sharded gradients held: the memory choice; pp = 1 only) or ``auto`` (the default: ``last_backward`` when
    its per-rank estimate fits the device, else ``every_backward``; what the layout planner picks for a given
    layout, decided when the run starts: ``strategy/memory_check.py``). reshard_after_forward: only ``false``
    (parameters stay unsharded for the whole step, see ``strategy/sharding.py`` for why).
    virtual_stages: blocks per pipeline rank (interleaved pipeline): the model is cut into ``pp x virtual_stages``
    blocks, rank ``r`` holds blocks ``r, r + pp, ...``; 1 (the default) is the plain pipeline.
    collective_timeout: how long a rank waits in a collective or point-to-point call for the others
    (``600``, ``90s``, ``10m``, ``1h``) before it stops with an error: a hung peer is reported within it.
    Seconds after construction. split_backward: split each chunk's backward into B (input and key/value state
    gradients) and a later W (linear weight gradients), the zero-bubble split (``model/split_linear.py``);
    not with LoRA, ``chunk.layer_checkpoint=full`` or data parallelism under bf16-mixed yet (the strategy refuses
    them at start)."""

    dp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    pp: int = 1
    virtual_stages: int = 1
    grad_reduce: str = "auto"
    reshard_after_forward: bool = False
    # pp > 1: prove each step's plan valid before running it (cheap; see conf/parallel/single.yaml).
    check_plan: bool = True
    # Debug: size headers on every message and plan fingerprints compared across ranks each step.
    check_messages: bool = False
    collective_timeout: int | float | str = "10m"
    # Split backward (zero-bubble pipelines): a chunk's backward computes input and key/value state gradients
    # only, a later weight action its linear layers' weight gradients (chunkflow_pl/model/split_linear.py).
    split_backward: bool = False
    # parallel=auto: the layout planner (chunkflow_pl.plan.layout) picks pp, dp_replicate, dp_shard, grad_reduce and
    # chunk.layer_checkpoint (and chunk.size / chunk.k when those are auto) for the launch's world size at start.
    auto: bool = False

    def __post_init__(self) -> None:
        for key, value in (("parallel.dp", self.dp), ("parallel.dp_replicate", self.dp_replicate),
                           ("parallel.dp_shard", self.dp_shard), ("parallel.pp", self.pp),
                           ("parallel.virtual_stages", self.virtual_stages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        if self.dp > 1 and (self.dp_replicate > 1 or self.dp_shard > 1):
            raise ValueError(f"parallel.dp={self.dp} with parallel.dp_replicate={self.dp_replicate} and "
                             f"parallel.dp_shard={self.dp_shard}: parallel.dp means dp_replicate alone; set either "
                             f"parallel.dp, or parallel.dp_replicate and parallel.dp_shard")
        if self.grad_reduce not in GRAD_REDUCE_SETTINGS:
            raise ValueError(f"parallel.grad_reduce={self.grad_reduce!r} must be one of "
                             f"{', '.join(GRAD_REDUCE_SETTINGS)}")
        if self.grad_reduce == "every_backward" and self.pp > 1:
            raise ValueError("parallel.grad_reduce=every_backward with parallel.pp > 1: the data-parallel ranks of a "
                             "stage run different chunk schedules, so a reduce after every backward would tie their "
                             "pipelines together and can deadlock; use parallel.grad_reduce=last_backward")
        if self.reshard_after_forward is not False:
            raise ValueError(f"parallel.reshard_after_forward={self.reshard_after_forward!r}: only false is supported "
                             "(data-parallel ranks run different chunk schedules, so per-forward all-gathers would "
                             "not pair up across ranks); parameters stay unsharded for a step and are resharded "
                             "after it")
        check_virtual_stages(self.virtual_stages, self.pp, self.data_parallel, self.auto)
        object.__setattr__(self, "collective_timeout",
                           parse_duration(self.collective_timeout, key="parallel.collective_timeout"))

    @property
    def data_parallel(self) -> int:
        """All data-parallel ranks of a stage: ``dp`` or ``dp_replicate x dp_shard``."""
        return self.dp * self.dp_replicate * self.dp_shard

    @property
    def timeout(self) -> timedelta:
        """``collective_timeout`` as the strategy (and torch.distributed) takes it."""
        return timedelta(seconds=float(self.collective_timeout))

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.pp

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParallelConfig:
        return from_dict(cls, d, "parallel")


def check_virtual_stages(virtual: int, pp: int, dp: int = 1, auto: bool = False) -> None:
    """``parallel.virtual_stages`` against the rest of the layout (what the runtime supports today); the layer
    count is checked where it is known (``ParallelDims``, ``model/stages.split_blocks``)."""
    if virtual == 1:
        return
    if auto:  # first: parallel=auto leaves pp at its placeholder 1
        raise ValueError(f"parallel.virtual_stages={virtual} with parallel=auto: the layout planner picks "
                         "parallel.virtual_stages itself (with the rest of the layout); drop the override, or set the "
                         "layout by hand (parallel.pp, parallel.dp) instead of parallel=auto")
    if pp == 1:
        raise ValueError(f"parallel.virtual_stages={virtual} with parallel.pp=1: virtual stages interleave the blocks "
                         "of a pipeline across its ranks, one process has nothing to interleave (it would only add "
                         "work); set parallel.virtual_stages=1 or parallel.pp > 1")
    if dp > 1:
        raise ValueError(f"parallel.virtual_stages={virtual} with {dp} data-parallel ranks: sharding (FSDP2) a rank "
                         "holding several blocks is not supported yet; use parallel.virtual_stages=1 with data "
                         "parallelism, or data parallelism 1 (parallel.dp=1, dp_replicate=1, dp_shard=1)")


def check_split_backward(layer_checkpoint: str) -> None:
    """Refuse what ``parallel.split_backward=true`` does not run with, knowable from the config alone (the rest,
    LoRA and FSDP2 mixed precision, is refused on the built model: ``strategy/split_backward.py``)."""
    if layer_checkpoint != "none":
        raise ValueError(f"parallel.split_backward=true with chunk.layer_checkpoint={layer_checkpoint}: a pending "
                         "weight action would keep every recomputed linear input and output gradient of the chunk, "
                         "which a checkpointed chunk's memory estimate does not count; set "
                         "chunk.layer_checkpoint=none or parallel.split_backward=false")
