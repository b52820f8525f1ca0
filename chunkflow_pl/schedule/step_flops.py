"""FLOPs of one ChunkFlow step and the peak FLOP/s they are measured against.

``step_flops`` counts chunks (each a list of ``Segment``) with ``chunkflow_pl.model.flops`` (matmuls +
causal attention with each segment's prefix); the default peak FLOP/s is
``chunkflow_pl.utils.peak_flops.measure_peak_flops`` in the training dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.flops import ModelFlops


@dataclass(frozen=True)
class StepFlops:
    model: float  # forward + backward of every token once (what MFU counts)
    dropped: float  # the first forwards of chunks recomputed later (kv-only on the last stage)

    @property
    def hardware(self) -> float:
        """What the device ran: a recomputed chunk's backward and recompute are in ``model``, plus its
        first (dropped) forward."""
        return self.model + self.dropped


def segment_pairs(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """``(new_tokens, prefix_tokens)`` of each segment of one chunk."""
    return [(s.length, s.start) for s in segments]


def step_flops(flops: ModelFlops, chunks: Sequence[Sequence[Segment]], recomputed: Iterable[int] = ()) -> StepFlops:
    """FLOPs of running every chunk once forward and backward, plus the dropped first forwards of the
    ``recomputed`` chunks."""
    model = sum(flops.train(segment_pairs(segs)) for segs in chunks)
    dropped = sum(flops.dropped_forward(segment_pairs(chunks[c])) for c in recomputed)
    return StepFlops(model=model, dropped=dropped)
