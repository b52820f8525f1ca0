"""Labels per whole sequence and chunk tensors: reconstruct every sequence from its chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow_pl.data.assemble import assemble_chunk, assemble_step
from chunkflow_pl.data.labels import num_supervised, targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.types import IGNORE_INDEX, ChunkBatch, Segment

M = IGNORE_INDEX


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[list[np.ndarray], list[np.ndarray | None], int]:
    """Sequences with random ids and optional label masks; lengths around 0, 1, C, C+1, 100 C."""
    c = draw(st.integers(1, 16))
    edge = st.sampled_from([0, 1, c, c + 1, 2 * c, 100 * c])
    lengths = draw(st.lists(st.one_of(edge, st.integers(0, 4 * c)), max_size=12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ids = [rng.integers(0, 1000, size=n) for n in lengths]
    labels: list[np.ndarray | None] = []
    for x in ids:
        masked = np.where(rng.random(x.size) < 0.3, M, x)  # HF style: aligned, -100 = unsupervised
        labels.append(masked if draw(st.booleans()) else None)
    return ids, labels, c


def check_chunk_layout(chunk: ChunkBatch) -> None:
    lens = [seg.length for seg in chunk.segments]
    assert chunk.input_ids_T.dtype == chunk.labels_T.dtype == chunk.position_ids_T.dtype == torch.int64
    assert chunk.cu_seqlens_B1.dtype == torch.int32
    assert chunk.cu_seqlens_B1.tolist() == np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).tolist()
    assert chunk.num_tokens == sum(lens) == chunk.labels_T.numel() == chunk.position_ids_T.numel()
    expected_pos = [p for seg in chunk.segments for p in range(seg.start, seg.end)]
    assert chunk.position_ids_T.tolist() == expected_pos


@settings(max_examples=200, deadline=None)
@given(token_batches())
def test_chunks_reconstruct_sequences_labels_and_positions(
    batch: tuple[list[np.ndarray], list[np.ndarray | None], int],
) -> None:
    ids, labels, c = batch
    targets = [targets_from_labels(x, y) for x, y in zip(ids, labels, strict=True)]
    plan = build_chunk_plan([x.size for x in ids], c)
    chunks = [assemble_chunk(segs, ids, targets) for segs in plan.chunks]

    got_ids: dict[int, list[int]] = {s: [] for s in range(len(ids))}
    got_lab: dict[int, list[int]] = {s: [] for s in range(len(ids))}
    got_pos: dict[int, list[int]] = {s: [] for s in range(len(ids))}
    # chunk index order is a valid forward order, so pieces arrive in sequence order
    for chunk in chunks:
        check_chunk_layout(chunk)
        cu = chunk.cu_seqlens_B1.tolist()
        for b, seg in enumerate(chunk.segments):
            assert len(got_ids[seg.seq]) == seg.start  # contiguous, in order
            got_ids[seg.seq] += chunk.input_ids_T[cu[b] : cu[b + 1]].tolist()
            got_lab[seg.seq] += chunk.labels_T[cu[b] : cu[b + 1]].tolist()
            got_pos[seg.seq] += chunk.position_ids_T[cu[b] : cu[b + 1]].tolist()
            last_label = int(chunk.labels_T[cu[b + 1] - 1])
            if seg.end == ids[seg.seq].size:
                assert last_label == M  # nothing predicts across two sequences
            else:  # the next piece's first token (or its mask), same sequence
                src = ids[seg.seq] if labels[seg.seq] is None else labels[seg.seq]
                assert last_label == int(src[seg.end])
    for s, x in enumerate(ids):
        assert got_ids[s] == x.tolist()
        assert got_lab[s] == targets[s].tolist()
        assert got_pos[s] == list(range(x.size))  # restarts per sequence, continues across chunks
    supervised = sum(int((ch.labels_T != M).sum()) for ch in chunks)
    assert supervised == sum(num_supervised(t) for t in targets)


def test_targets_shift_hf_labels() -> None:
    ids = [5, 6, 7, 8, 9]
    labels = [M, M, 7, 8, 9]
    assert targets_from_labels(ids, labels).tolist() == [M, 7, 8, 9, M]
    assert targets_from_labels(ids).tolist() == [6, 7, 8, 9, M]
    out = targets_from_labels(torch.tensor(ids, dtype=torch.int32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64
    assert isinstance(targets_from_labels(np.array(ids)), np.ndarray)
    assert targets_from_labels([]).tolist() == []
    assert targets_from_labels([3]).tolist() == [M]
    assert num_supervised(targets_from_labels(ids, labels)) == 3
    assert num_supervised(torch.tensor([M, 1, M])) == 1
    with pytest.raises(ValueError):
        targets_from_labels([1, 2], [1])
    with pytest.raises(ValueError):
        targets_from_labels(np.zeros((2, 2)))


def test_layout_of_types_docstring() -> None:
    ids = {7: np.arange(100, 111), 2: np.arange(200, 204), 5: np.arange(500, 502)}
    tg = {s: targets_from_labels(x) for s, x in ids.items()}
    chunk = assemble_chunk([Segment(7, 8, 11), Segment(2, 0, 4), Segment(5, 0, 2)], ids, tg)
    assert chunk.position_ids_T.tolist() == [8, 9, 10, 0, 1, 2, 3, 0, 1]
    assert chunk.cu_seqlens_B1.tolist() == [0, 3, 7, 9]
    assert chunk.labels_T.tolist() == [109, 110, M, 201, 202, 203, M, 501, M]


def test_assemble_step_and_padding() -> None:
    ids = [np.arange(10), np.arange(3)]
    tg = [targets_from_labels(x) for x in ids]
    plan = build_chunk_plan([10, 3], 4)
    step = assemble_step(
        plan.chunks[:2], ids, tg, seq_lens=[10, 3], sample_ids=[42, 7], num_label_tokens=11,
        step_index=3, num_chunks_global=len(plan.chunks), pad_to=4,
    )  # fmt: skip
    assert len(step.chunks) == 4 and [ch.num_tokens for ch in step.chunks[2:]] == [0, 0]
    empty = step.chunks[-1]
    assert empty.cu_seqlens_B1.tolist() == [0] and empty.segments == ()
    assert empty.cu_seqlens_B1.dtype == torch.int32 and empty.labels_T.dtype == torch.int64
    assert step.sample_ids == [42, 7] and step.num_label_tokens == 11 and step.step_index == 3
    assert step.num_chunks_global == len(plan.chunks)
    with pytest.raises(ValueError):
        assemble_step(plan.chunks, ids, tg, [10, 3], [42, 7], 11, 0, 3, pad_to=1)
    with pytest.raises(ValueError):
        assemble_step([[Segment(1, 0, 5)]], ids, tg, [10, 3], [42, 7], 11, 0, 1)
    with pytest.raises(ValueError):
        assemble_chunk([Segment(1, 2, 5)], ids, tg)
