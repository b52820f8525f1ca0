"""Global batches as a map-style dataset: item ``(epoch, i)`` = this rank's ``StepBatch`` of global
batch ``i`` of ``epoch``.

One global batch (``global_batch_size`` sequences, one optimizer step)::

    permutation(epoch) --slice i--> sample ids --lengths--> build_chunk_plan (Alg. 1)
        --> assign_to_ranks (dp, chunk cost) --> this rank's chunks, in increasing plan index (a valid forward
        order) --> assemble_step (tokens + whole-sequence targets) --> StepBatch

Every rank computes the same plan and assignment from the same lengths, so ranks agree without
talking; ``num_label_tokens`` counts the whole global batch from labels alone (no tokens needed).
An epoch has ``ceil(N / global_batch_size)`` batches: the last, partial one is kept.

The sampler yields ``(epoch, i)`` keys, so the epoch travels with each request into worker
processes, and the loader's resumable state is just (epoch, position).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.utils.data
from torch.utils.data.distributed import DistributedSampler

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.balance import DEFAULT_CHUNK_COST, ChunkCost, assign_to_ranks
from chunkflow_pl.data.labels import num_supervised_from_labels, targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.data.sources import TokenStore
from chunkflow_pl.data.types import StepBatch

_SHUFFLE_STREAM = 3  # keeps the permutation stream apart from the synthetic generator's streams


@dataclass(frozen=True)
class BatchingSpec:
    global_batch_size: int
    chunk_size: int
    dp_rank: int = 0
    dp_size: int = 1
    shuffle: bool = True
    seed: int = 0
    limit_batches: int | None = None  # cap on global batches per epoch (smoke runs)
    chunk_cost: ChunkCost = DEFAULT_CHUNK_COST  # what a chunk costs a replica (the trained model's, see balance)

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.chunk_size < 1:
            raise ValueError(f"global_batch_size and chunk_size must be positive: {self}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank={self.dp_rank} is not in [0, dp_size={self.dp_size})")


def epoch_permutation(n: int, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
    """Order of the ``n`` sequences in ``epoch``: identity, or a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SHUFFLE_STREAM, epoch]))
    return rng.permutation(n).astype(np.int64)


class GlobalBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``StepBatch`` keyed by ``(epoch, i)`` (see module docstring)."""

    def __init__(self, store: TokenStore, spec: BatchingSpec) -> None:
        if len(store) == 0:
            raise ValueError("the dataset has no sequences")
        self.store = store
        self.spec = spec
        n = math.ceil(len(store) / spec.global_batch_size)
        self.num_batches = n if spec.limit_batches is None else min(n, spec.limit_batches)
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_batches

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch or self._perm is None:  # one permutation per epoch, cached
            self._perm = epoch_permutation(len(self.store), epoch, self.spec.shuffle, self.spec.seed)
            self._perm_epoch = epoch
        return self._perm

    def sample_ids(self, epoch: int, i: int) -> np.ndarray:
        """Dataset indices of the sequences of global batch ``i`` of ``epoch``."""
        if not 0 <= i < self.num_batches:
            raise IndexError(f"global batch {i} out of range [0, {self.num_batches})")
        g = self.spec.global_batch_size
        return self.permutation(epoch)[i * g : (i + 1) * g]

    def __getitem__(self, key: tuple[int, int] | int) -> StepBatch:
        epoch, i = key if isinstance(key, tuple) else (0, int(key))
        spec = self.spec
        ids = self.sample_ids(epoch, i)
        seq_lens = [int(x) for x in self.store.lengths[ids]]
        labels = {s: self.store.labels(int(j)) for s, j in enumerate(ids)}
        num_label_tokens = sum(num_supervised_from_labels(n, labels[s]) for s, n in enumerate(seq_lens))

        plan = build_chunk_plan(seq_lens, spec.chunk_size)
        assignment = assign_to_ranks(plan, spec.dp_size, spec.chunk_cost)
        mine = assignment.per_rank[spec.dp_rank]  # increasing plan index = valid forward order
        chunks = [plan.chunks[c] for c in mine]
        used = sorted({seg.seq for chunk in chunks for seg in chunk})  # only load what this rank runs
        tokens = {s: self.store.tokens(int(ids[s])) for s in used}
        targets = {s: targets_from_labels(tokens[s], labels[s]) for s in used}
        return assemble_step(
            chunks,
            tokens,
            targets,
            seq_lens=seq_lens,
            sample_ids=[int(x) for x in ids],
            num_label_tokens=num_label_tokens,
            step_index=epoch * self.num_batches + i,
            num_chunks_global=len(plan.chunks),
            pad_to=assignment.num_micro_steps,  # equal micro-steps on every rank
        )


class GlobalBatchSampler(DistributedSampler):
    """Yields ``(epoch, i)`` for ``i`` in ``range(num_batches)``; resumable, epoch-aware.

    It subclasses ``DistributedSampler`` only so that Lightning (``use_distributed_sampler=True``)
    and similar frameworks see the loader as already sharded and do not inject their own sampler:
    every rank must see every global batch (it takes its share of the chunks itself).
    ``DistributedSampler.__init__`` is deliberately not called (it needs a process group).

    Epochs: ``set_epoch`` (Lightning calls it every epoch) or, in plain loops, automatically: an
    exhausted pass moves the sampler to the next epoch.
    """

    def __init__(self, num_batches: int, epoch: int = 0) -> None:
        self.num_batches = int(num_batches)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return _EpochIterator(self, self.epoch, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])


class _EpochIterator(Iterator[tuple[int, int]]):
    """One pass; its state (epoch, position) is what StatefulDataLoader saves and restores."""

    def __init__(self, sampler: GlobalBatchSampler, epoch: int, pos: int) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.pos = pos

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> tuple[int, int]:
        if self.pos >= self.sampler.num_batches:
            self.sampler.epoch = max(self.sampler.epoch, self.epoch + 1)
            raise StopIteration
        key = (self.epoch, self.pos)
        self.pos += 1
        return key

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        # a finished pass resumes into the next epoch (the loader then starts a fresh pass)
        self.sampler.epoch = self.epoch + 1 if self.pos >= self.sampler.num_batches else self.epoch
