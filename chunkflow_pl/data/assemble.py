"""Turn planned segments into tensors: ``ChunkBatch`` per chunk, ``StepBatch`` per rank and step.

One chunk = its segments laid side by side (drawn in ``types.py``). Here, chunk_size 8, sequence 0
has 11 tokens ``a..k`` (split 0[0:8) | 0[8:11)) and sequence 1 has 4 tokens ``w x y z``::

    chunk 0         tokens   a b c d e f g h            one segment 0[0:8)
                    labels   b c d e f g h i            h predicts i, the first token of chunk 1
                    pos      0 1 2 3 4 5 6 7
                    cu       0               8
    chunk 1         tokens   i j k | w x y z            0[8:11) then 1[0:4)
                    labels   j k - | x y z -            '-' = -100: a sequence's last token
                    pos      8 9 10| 0 1 2 3            continues sequence 0, restarts for 1
                    cu       0      3        7

Labels are slices of the whole-sequence targets (``labels.targets_from_labels``), never recomputed
per chunk, which is what makes the loss independent of where the cuts fall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from chunkflow_pl.data.types import ChunkBatch, Segment, StepBatch

IntArray = torch.Tensor | np.ndarray | Sequence[int]
PerSeq = Mapping[int, IntArray] | Sequence[IntArray]  # whole sequences, indexed by Segment.seq


def _int64_T(x: IntArray) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=torch.int64, device="cpu").reshape(-1)
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))


def assemble_chunk(
    segments: Sequence[Segment], token_ids_by_seq: PerSeq, targets_by_seq: PerSeq
) -> ChunkBatch:
    """Build the tensors of one chunk. ``*_by_seq[s]`` are whole sequences indexed by ``Segment.seq``.

    An empty ``segments`` gives an empty chunk (``T = 0``, ``cu_seqlens_B1 = [0]``): the padding a
    rank with fewer chunks runs so that all ranks take the same number of micro-steps.
    """
    ids_parts: list[torch.Tensor] = []
    lab_parts: list[torch.Tensor] = []
    pos_parts: list[torch.Tensor] = []
    for seg in segments:
        ids_T = _int64_T(token_ids_by_seq[seg.seq])
        tgt_T = _int64_T(targets_by_seq[seg.seq])
        if ids_T.numel() != tgt_T.numel():
            raise ValueError(f"sequence {seg.seq}: {ids_T.numel()} tokens but {tgt_T.numel()} targets")
        if not 0 <= seg.start < seg.end <= ids_T.numel():
            raise ValueError(f"{seg} does not fit sequence {seg.seq} of {ids_T.numel()} tokens")
        ids_parts.append(ids_T[seg.start : seg.end])
        lab_parts.append(tgt_T[seg.start : seg.end])
        # RoPE position = index in the whole sequence: restarts per sequence, continues across chunks
        pos_parts.append(torch.arange(seg.start, seg.end, dtype=torch.int64))

    empty_T = torch.zeros(0, dtype=torch.int64)
    lengths_B = torch.tensor([seg.length for seg in segments], dtype=torch.int64)
    cu_seqlens_B1 = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seqlens_B1[1:] = torch.cumsum(lengths_B, dim=0).to(torch.int32)
    return ChunkBatch(
        input_ids_T=torch.cat(ids_parts) if ids_parts else empty_T,
        labels_T=torch.cat(lab_parts) if lab_parts else empty_T.clone(),
        position_ids_T=torch.cat(pos_parts) if pos_parts else empty_T.clone(),
        cu_seqlens_B1=cu_seqlens_B1,
        segments=tuple(segments),
    )


def assemble_step(
    plan_chunks_for_rank: list[list[Segment]],
    token_ids_by_seq: PerSeq,
    targets_by_seq: PerSeq,
    seq_lens: list[int],
    sample_ids: list[int],
    num_label_tokens: int,
    step_index: int,
    num_chunks_global: int,
    pad_to: int | None = None,
) -> StepBatch:
    """One rank's ``StepBatch``: its chunks in the given (forward-valid) order.

    ``num_label_tokens`` must be the supervised-token count of the whole global batch (all ranks).
    ``pad_to`` appends empty chunks until the rank has that many micro-steps (see ``balance``).
    """
    if len(seq_lens) != len(sample_ids):
        raise ValueError(f"{len(seq_lens)} seq_lens but {len(sample_ids)} sample_ids")
    for chunk in plan_chunks_for_rank:
        for seg in chunk:
            if seg.end > seq_lens[seg.seq]:
                raise ValueError(f"{seg} exceeds seq_lens[{seg.seq}] = {seq_lens[seg.seq]}")
    # convert each used sequence once, not once per segment (a long sequence spans many chunks)
    used = sorted({seg.seq for chunk in plan_chunks_for_rank for seg in chunk})
    ids_by_seq = {s: _int64_T(token_ids_by_seq[s]) for s in used}
    tgt_by_seq = {s: _int64_T(targets_by_seq[s]) for s in used}
    chunks = [assemble_chunk(segs, ids_by_seq, tgt_by_seq) for segs in plan_chunks_for_rank]
    if pad_to is not None:
        if pad_to < len(chunks):
            raise ValueError(f"pad_to={pad_to} is fewer than the rank's {len(chunks)} chunks")
        chunks += [assemble_chunk([], ids_by_seq, tgt_by_seq) for _ in range(pad_to - len(chunks))]
    return StepBatch(
        chunks=chunks,
        seq_lens=list(seq_lens),
        sample_ids=list(sample_ids),
        num_label_tokens=int(num_label_tokens),
        step_index=int(step_index),
        num_chunks_global=int(num_chunks_global),
    )
