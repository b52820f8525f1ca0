"""Actions of a single-device step plan (paper Algorithm 2)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Op(str, Enum):
    FORWARD = "forward"  # run the chunk forward; store its keys/values in the state store
    RECOMPUTE = "recompute"  # re-run a forward whose activations were dropped, right before its backward
    BACKWARD = "backward"  # backward of the chunk's loss plus the gradient of its keys/values


@dataclass(frozen=True)
class Action:
    op: Op
    chunk: int
    keep: bool = True  # FORWARD only: keep activations for backward (False: recompute later)

    def __str__(self) -> str:
        suffix = "" if self.op is not Op.FORWARD or self.keep else "(drop)"
        return f"{self.op.value[0].upper()}{self.chunk}{suffix}"
