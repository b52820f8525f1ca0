"""FLOPs of one ChunkFlow step and the peak FLOP/s they are measured against.

``step_flops`` counts the chunks of a ``StepBatch`` with ``chunkflow_pl.model.flops`` (matmuls +
causal attention with each segment's prefix); the default peak FLOP/s is
``chunkflow_pl.utils.peak_flops.measure_peak_flops`` in the training dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.flops import ModelFlops


@dataclass(frozen=True)
class StepFlops:
    model: float  # forward + backward of every token once (what MFU counts)
    recompute: float  # forwards run again for chunks whose activations were dropped

    @property
    def hardware(self) -> float:
        return self.model + self.recompute


def chunk_segments(batch: StepBatch, c: int) -> list[tuple[int, int]]:
    """``(new_tokens, prefix_tokens)`` of the segments of chunk ``c``."""
    return [(s.length, s.start) for s in batch.chunks[c].segments]


def step_flops(flops: ModelFlops, batch: StepBatch, recomputed: Iterable[int] = ()) -> StepFlops:
    """FLOPs of running every chunk of ``batch`` once forward and backward, plus the ``recomputed`` chunks' forwards."""
    model = sum(flops.train(chunk_segments(batch, c)) for c in range(len(batch.chunks)))
    again = sum(flops.forward(chunk_segments(batch, c)) for c in recomputed)
    return StepFlops(model=model, recompute=again)


