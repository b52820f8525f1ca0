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


@dataclass(frozen=True)
class ChunkConfig:
    """size: max tokens per chunk (sizes accept ``32k``); longer sequences become dependent chunks.
    k: chunks of one sequence whose activations are kept during forward; the rest are recomputed.
    offload_state: keep split sequences' key/value state in host memory (pinned on CUDA)."""

    size: int = field(default=4096, metadata=SIZE)
    k: int = 1
    offload_state: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", parse_size(self.size, key="chunk.size"))
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"chunk.k={self.k!r} must be an integer")
        if self.k < 1:
            raise ValueError(f"chunk.k={self.k} must be >= 1 (chunks of a sequence whose activations are kept)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkConfig:
        return from_dict(cls, d, "chunk")


@dataclass(frozen=True)
class ParallelConfig:
    """dp: data-parallel replicas; pp: pipeline stages. dp x pp ranks in all (checked against the world
    size where the device mesh is built, not here). collective_timeout: how long a rank waits in a
    collective or point-to-point call for the others (``600``, ``90s``, ``10m``, ``1h``) before it stops
    with an error: a hung peer is reported within it. Seconds after construction."""

    dp: int = 1
    pp: int = 1
    # pp > 1: prove each step's plan valid before running it (cheap; see conf/parallel/single.yaml).
    check_plan: bool = True
    # Debug: size headers on every message and plan fingerprints compared across ranks each step.
    check_messages: bool = False
    collective_timeout: int | float | str = "10m"

    def __post_init__(self) -> None:
        for key, value in (("parallel.dp", self.dp), ("parallel.pp", self.pp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} must be a positive integer")
        object.__setattr__(self, "collective_timeout",
                           parse_duration(self.collective_timeout, key="parallel.collective_timeout"))

    @property
    def timeout(self) -> timedelta:
        """``collective_timeout`` as the strategy (and torch.distributed) takes it."""
        return timedelta(seconds=float(self.collective_timeout))

    @property
    def world_size(self) -> int:
        return self.dp * self.pp

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParallelConfig:
        return from_dict(cls, d, "parallel")
