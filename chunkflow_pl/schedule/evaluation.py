"""Validation through the step runner: a forward-only step plan and the sums it fills.

A validation batch runs the training step's chunk layout and state passing, forward only. Per stage, the
chunks in plan order (a chain's chunks in sequence order, as Algorithm 2 runs its forwards)::

    stage s:   [<A c]  F c (drop)  [>A c]     for every chunk c with tokens

No chunk keeps activations (nothing runs backward), so the plan's caps are 0: only the running chunk's
activations and the K/V state of sequences still being read exist, and the executor frees a sequence's state
at its last chunk. Every stage runs the chunks in the same order, so each channel's k-th send meets the k-th
receive and the plan cannot deadlock, on gloo or NCCL.

``LossByPosition``: summed token cross-entropy and supervised-token counts per position bucket. The loss at
slot ``t`` of a sequence is that of predicting token ``t + 1`` from tokens ``0..t``; it counts at position
``t + 1``, the predicted token's index (= the number of context tokens), so bucket ``[0, 4096)`` holds the
predictions made from fewer than 4096 tokens of context. Sums are float64, on the device,
read once at the end of the pass (no synchronisation per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chunkflow_pl.data.types import Segment
from chunkflow_pl.schedule.pipeline_actions import Action, Comm, CommOp, Op, PipeAction, PipelinePlan
from chunkflow_pl.utils.constants import IGNORE_INDEX


def plan_forward(chunks: Sequence[Sequence[Segment]], pp: int) -> PipelinePlan:
    """The forward-only plan of one replica: every chunk with tokens, in order, on every stage."""
    tokens = tuple(sum(s.length for s in c) for c in chunks)
    stages: list[tuple[PipeAction, ...]] = []
    for s in range(pp):
        acts: list[PipeAction] = []
        for c, t in enumerate(tokens):
            if t == 0:  # data-parallel padding: no work, no messages
                continue
            if s > 0:
                acts.append(Comm(CommOp.RECV_ACT, c, s - 1, t))
            acts.append(Action(Op.FORWARD, c, keep=False))
            if s < pp - 1:
                acts.append(Comm(CommOp.SEND_ACT, c, s + 1, t))
        stages.append(tuple(acts))
    return PipelinePlan(tuple(stages), (0,) * pp, tokens)


def is_forward_only(plan: PipelinePlan) -> bool:
    """True when ``plan`` has no backward, recompute or kept forward (what an evaluation may run)."""
    for acts in plan.stages:
        for a in acts:
            if isinstance(a, Action) and (a.op is not Op.FORWARD or a.keep):
                return False
            if isinstance(a, Comm) and a.kind != "act":
                return False
    return True


class LossByPosition:
    """Token cross-entropy and supervised tokens summed per position bucket.

    ``edges``: increasing upper bounds; bucket ``i`` holds positions ``[edges[i-1], edges[i])`` (``[0, edges[0])``
    first, ``>= edges[-1]`` last: ``len(edges) + 1`` buckets).
    """

    def __init__(self, edges: Sequence[int], device: torch.device | str = "cpu") -> None:
        edges = [int(e) for e in edges]
        if not edges or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] <= 0:
            raise ValueError(f"position bucket edges {edges} must be positive and strictly increasing")
        self.edges = tuple(edges)
        # Normal tensors even when made under Lightning's inference mode: the forward-only step adds to them outside
        # it (StepRunner.evaluate), and an inference tensor cannot be updated in place there.
        with torch.inference_mode(False):
            self._edges = torch.tensor(edges, dtype=torch.int64, device=device)
            self.loss_sum = torch.zeros(len(edges) + 1, dtype=torch.float64, device=device)
            self.tokens = torch.zeros(len(edges) + 1, dtype=torch.float64, device=device)

    def add(self, loss_T: torch.Tensor, labels_T: torch.Tensor, position_ids_T: torch.Tensor) -> None:
        """Add one chunk: per-token losses (0 where not supervised), its labels and its input tokens' positions
        (the predicted token's position is one more)."""
        supervised = labels_T != IGNORE_INDEX
        bucket = torch.bucketize(position_ids_T.to(self._edges.device) + 1, self._edges, right=True)
        bucket = bucket.to(self.loss_sum.device)
        self.loss_sum.index_add_(0, bucket, torch.where(supervised, loss_T, 0).to(self.loss_sum))
        self.tokens.index_add_(0, bucket, supervised.to(self.tokens))

    def values(self) -> list[float]:
        """``[*loss_sum, *tokens]`` as floats (one device read)."""
        return torch.cat([self.loss_sum, self.tokens]).tolist()


class EvalSums:
    """What a validation pass accumulates on the last stage: ``buckets`` (the configured position buckets, whose
    sums also give the total) and ``curve`` (power-of-two bins, for the plot of loss against position)."""

    CURVE_EDGES = tuple(2**i for i in range(1, 31))

    def __init__(self, bucket_edges: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.buckets = LossByPosition(bucket_edges, device)
        self.curve = LossByPosition(self.CURVE_EDGES, device)

    def add(self, loss_T: torch.Tensor, labels_T: torch.Tensor, position_ids_T: torch.Tensor) -> None:
        self.buckets.add(loss_T, labels_T, position_ids_T)
        self.curve.add(loss_T, labels_T, position_ids_T)

    def values(self) -> list[float]:
        """Every sum as one flat list of floats (what the strategy reduces over ranks)."""
        return self.buckets.values() + self.curve.values()
