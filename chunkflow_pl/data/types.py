"""Types at the data -> training boundary.

A *segment* is a contiguous piece ``[start, end)`` of one sequence of the global batch. A *chunk* is a
list of segments holding at most ``chunk.size`` tokens in all. A sequence longer than ``chunk.size``
is split into consecutive segments that live in different chunks (its *chain*); a segment with
``start > 0`` attends to the keys/values of tokens ``[0, start)`` of its sequence (the prefix state).

Layout of one chunk (``ChunkBatch``), three segments: the tail of sequence 7 (its tokens 8..10,
prefix of 8 tokens held by the state store) and two whole short sequences 2 and 5::

    token slot      0  1  2 | 3  4  5  6 | 7  8
    segment         7[8:11) | 2[0:4)     | 5[0:2)
    position_ids    8  9 10 | 0  1  2  3 | 0  1      RoPE restarts per sequence, continues across chunks
    cu_seqlens_B1   0        3            7     9     query offsets of the segments (int32)
    prefix_lens     8        0            0           = segment.start
    keys seen       [prefix 8 | own 3] [own 4] [own 2] -> cu_seqlens_k = 0, 11, 15, 17
    labels_T        next token of the same sequence; -100 where there is none (last token of a
                    sequence) or the next token is not supervised. The label of a segment's last
                    token is the first token of the sequence's next segment (computed before splitting).

Causal masking inside a segment with a prefix is bottom-right aligned: query i of the segment sees
the whole prefix and own keys 0..i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from chunkflow_pl.utils.constants import IGNORE_INDEX  # noqa: F401  (re-exported for the data layer)

if TYPE_CHECKING:  # annotations only: planning (lengths, segments) runs without torch
    import torch


class Segment(NamedTuple):
    """Tokens ``[start, end)`` of sequence ``seq`` (an index into the global batch).

    A NamedTuple (immutable, hashable, ordered) so Lightning's ``apply_to_collection`` can rebuild it
    when a precision plugin walks the batch.
    """

    seq: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class ChunkPlan:
    """Output of chunk construction (paper Algorithm 1) for one global batch, lengths only.

    ``chunks[c]`` is the ordered segment list of chunk ``c``; ``chains[s]`` lists, in order, the chunks
    holding the pieces of sequence ``s`` for every sequence split into more than one piece.
    """

    chunks: list[list[Segment]]
    chains: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class ChunkBatch:
    """Tensors of one chunk (see module docstring for the drawn layout). ``T`` = tokens in the chunk."""

    input_ids_T: torch.Tensor  # int64 [T]
    labels_T: torch.Tensor  # int64 [T], IGNORE_INDEX where not supervised
    position_ids_T: torch.Tensor  # int64 [T]
    cu_seqlens_B1: torch.Tensor  # int32 [B+1], B = number of segments
    segments: tuple[Segment, ...]  # Segment.seq indexes StepBatch.seq_lens

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_T.numel())


@dataclass
class StepBatch:
    """One data-parallel rank's share of one global batch: what ``training_step`` receives.

    ``num_label_tokens`` counts supervised tokens of the *whole* global batch (all ranks), known
    before any backward, so loss = sum(token CE) / num_label_tokens is exact under any chunking.
    """

    chunks: list[ChunkBatch]
    seq_lens: list[int]  # full length of every sequence of the global batch, by Segment.seq
    sample_ids: list[int]  # dataset index of every sequence of the global batch, by Segment.seq
    num_label_tokens: int
    step_index: int = 0
    num_chunks_global: int = 0
