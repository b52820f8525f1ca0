"""``ChunkFlowDataModule``: sources -> tokenised store -> per-rank ``StepBatch`` per global batch.

Loader: torchdata's ``StatefulDataLoader`` over ``GlobalBatchDataset`` with ``batch_size=None``
(each item already is a batch) and ``GlobalBatchSampler`` (keys ``(epoch, i)``). The datamodule
shards by data-parallel rank itself; it does not rely on Lightning's sampler injection (and the
sampler looks like a ``DistributedSampler`` so Lightning leaves it alone either way).

Resuming (mid-epoch, exact): two mechanisms carry the same loader state, and both are safe together:

* Lightning's fit loop saves ``StatefulDataLoader.state_dict()`` in the checkpoint
  (``loops.fit_loop.state_dict.combined_loader``) and loads it back into the new loader when it
  restarts mid-epoch; Lightning itself never skips batches.
* This datamodule's ``state_dict()`` holds the same loader state (plus the epoch and a fingerprint of
  the batching); ``load_state_dict()`` keeps it until ``train_dataloader()`` builds the loader.

Validation (``data.val_path`` or ``data.val_fraction``): ``val_dataloader`` yields this rank's share of each
global batch of the validation set, in file order (never shuffled), chunked and balanced like training. It has
no state to resume: every validation pass reads the whole set. Without validation data it returns ``[]``, which
Lightning takes as "no validation".

``StatefulDataLoader.load_state_dict`` *replaces* the pending state (it does not advance anything),
so loading the same snapshot twice is idempotent: no double skip. A snapshot taken at the end of a
pass resumes at the start of the next epoch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch.utils.data
from torchdata.stateful_dataloader import StatefulDataLoader

from chunkflow_pl.data.balance import DEFAULT_CHUNK_COST, ChunkCost
from chunkflow_pl.data.cache import SourceSpec, build_cache, cache_entry_dir, load_cached_store
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.dataset import BatchingSpec, GlobalBatchDataset, GlobalBatchSampler
from chunkflow_pl.data.holdout import SubsetStore, holdout_split
from chunkflow_pl.data.sources import DataError, TokenStore
from chunkflow_pl.data.sources.synthetic import SyntheticStore
from chunkflow_pl.data.types import StepBatch

log = logging.getLogger(__name__)


def _keep(batch: StepBatch) -> StepBatch:
    """collate_fn: the item already is the batch (module-level so worker processes can pickle it)."""
    return batch


class ResumableLoader(StatefulDataLoader):
    """``StatefulDataLoader`` that keeps its position when its iterator is dropped mid-pass.

    Lightning's fit teardown resets ``loader._iterator = None`` (to stop workers). A checkpoint
    written after ``fit`` returns (``trainer.save_checkpoint``) would then record "start of a new
    pass" and a resumed run would replay the epoch from its first batch. Dropping an unfinished
    iterator here first stores its state as the state of the next pass.
    """

    @property
    def _iterator(self) -> Any:
        return self.__dict__.get("_live_iterator")

    @_iterator.setter
    def _iterator(self, value: Any) -> None:
        old = self.__dict__.get("_live_iterator")
        if value is None and old is not None and not old._finished and self.__dict__.get("next_iter_state") is None:
            self.next_iter_state = old.state_dict()
        self.__dict__["_live_iterator"] = value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # an explicit position (or {} = from the start) replaces whatever the dropped iterator left
        self.__dict__["_live_iterator"] = None
        self.next_iter_state = None
        super().load_state_dict(state_dict)


def make_stores(data: DataConfig, vocab_size: int | None,
                max_seq_len: int | None = None) -> tuple[TokenStore, TokenStore | None]:
    """``(train, validation)`` stores: validation from ``data.val_path`` (its bad records follow
    ``data.on_bad_record`` as the training file's do), or ``data.val_fraction`` of the data held out, or None."""
    store = make_store(data, vocab_size, max_seq_len)
    if data.val_paths:
        spec = source_spec(data, vocab_size, max_seq_len, paths=data.val_paths)
        return store, load_cached_store(spec, data.resolved_cache_dir(), data.tokenize_workers)
    if data.val_fraction is not None:
        train_ids, val_ids = holdout_split(len(store), data.val_fraction, data.seed)
        return SubsetStore(store, train_ids), SubsetStore(store, val_ids)
    return store, None


def make_store(data: DataConfig, vocab_size: int | None, max_seq_len: int | None = None) -> TokenStore:
    """The ``TokenStore`` for a data config (builds the tokenised cache on first use). Records longer
    than ``max_seq_len`` are bad records (error, or skipped with ``data.on_bad_record=skip``)."""
    if data.kind == "synthetic":
        if vocab_size is None:
            raise ValueError("synthetic data needs the model's vocab_size")
        store = SyntheticStore(data.num_sequences, int(data.max_len), int(data.min_len), vocab_size, data.seed)
        longest = int(store.lengths.max())
        if max_seq_len is not None and longest > max_seq_len:
            raise DataError(f"synthetic sequence {int(store.lengths.argmax())} has {longest} tokens, more than the "
                            f"model's max_position_embeddings={max_seq_len}; lower data.max_len or raise "
                            f"model.overrides.max_position_embeddings")
        return store
    spec = source_spec(data, vocab_size, max_seq_len)
    return load_cached_store(spec, data.resolved_cache_dir(), data.tokenize_workers)


def source_spec(data: DataConfig, vocab_size: int | None, max_seq_len: int | None = None,
                paths: list[str] | None = None) -> SourceSpec:
    """The tokenised cache's key for ``data.path`` (or ``paths``: the validation files, read the same way)."""
    return SourceSpec(
        kind=data.kind,
        paths=tuple(data.paths if paths is None else paths),
        tokenizer=data.tokenizer,
        train_on=data.train_on,
        vocab_size=vocab_size,
        on_bad_record=data.on_bad_record,
        max_len=max_seq_len,
    )


class ChunkFlowDataModule(pl.LightningDataModule):
    """Each training item is one ``StepBatch``: this rank's share of one global batch.

    ``dp_size``: data-parallel ranks; ``dp_rank``: this rank's data-parallel coordinate, or a callable
    returning it once the processes exist. Default (None): asked of the Trainer's strategy in ``setup``
    (``distributed_sampler_kwargs``: ChunkFlowStrategy owns the layout, and every pipeline stage of a replica
    must get the same batch); 0 of 1 without a Trainer.
    ``limit_batches``: cap on global batches per epoch (None = all).
    ``max_seq_len``: the longest sequence the model takes (its max_position_embeddings); longer
    records are bad records. None: no limit.
    ``chunk_cost``: what a chunk costs a replica, for the data-parallel balance. Default (None): asked of the
    Trainer's strategy in ``setup`` (``ChunkFlowStrategy.balance_cost``: the trained model's cost model, per
    stage); without one, a fixed 7B-class ratio (``data.balance.DEFAULT_CHUNK_COST``).
    """

    def __init__(
        self,
        data: DataConfig,
        chunk_size: int,
        vocab_size: int,
        dp_rank: int | Callable[[], int] | None = None,
        dp_size: int | None = None,
        limit_batches: int | None = None,
        max_seq_len: int | None = None,
        chunk_cost: ChunkCost | None = None,
    ) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.data = data
        self.chunk_size = int(chunk_size)
        self.vocab_size = int(vocab_size)
        self._dp_rank = dp_rank
        self.dp_rank: int | None = None  # resolved in setup()
        self._dp_size = dp_size
        self.dp_size: int | None = None  # resolved in setup()
        self.limit_batches = limit_batches
        self.max_seq_len = max_seq_len
        if chunk_cost is not None and not isinstance(chunk_cost, ChunkCost):
            raise TypeError(f"chunk_cost must be a data.balance.ChunkCost, got {type(chunk_cost).__name__}")
        self.chunk_cost = chunk_cost
        self.store: TokenStore | None = None
        self.val_store: TokenStore | None = None  # data.val_path or data.val_fraction, else None
        self.dataset: GlobalBatchDataset | None = None
        self.val_dataset: GlobalBatchDataset | None = None
        self._loader: ResumableLoader | None = None
        self._pending_state: dict[str, Any] | None = None
        self._tokenized_here = False

    # ------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        # Lightning runs this on one process per node before setup(): tokenise once, not per rank.
        if self.data.kind != "synthetic":
            spec, root = source_spec(self.data, self.vocab_size, self.max_seq_len), self.data.resolved_cache_dir()
            self._tokenized_here = not (cache_entry_dir(spec, root) / "meta.json").is_file()
            build_cache(spec, root, self.data.tokenize_workers)
            if self.data.val_paths:
                build_cache(source_spec(self.data, self.vocab_size, self.max_seq_len, self.data.val_paths), root,
                            self.data.tokenize_workers)

    def setup(self, stage: str | None = None) -> None:
        self._resolve_dp()
        if self.chunk_cost is None:
            trainer = getattr(self, "trainer", None)
            cost = getattr(trainer.strategy, "balance_cost", None) if trainer is not None else None
            self.chunk_cost = cost() if callable(cost) else DEFAULT_CHUNK_COST
        self._ensure_store()
        assert self.dp_rank is not None and self.dp_size is not None
        spec = BatchingSpec(
            global_batch_size=self.data.global_batch_size,
            chunk_size=self.chunk_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            shuffle=self.data.shuffle,
            seed=self.data.seed,
            limit_batches=self.limit_batches,
            chunk_cost=self.chunk_cost,
        )
        self.dataset = GlobalBatchDataset(self.store, spec)
        if self.val_store is not None:  # the whole set, in order, every pass
            self.val_dataset = GlobalBatchDataset(self.val_store, replace(spec, shuffle=False, limit_batches=None))

    def _ensure_store(self) -> TokenStore:
        if self.store is None:
            self.store, self.val_store = make_stores(self.data, self.vocab_size, self.max_seq_len)
        return self.store

    def longest_sequence(self) -> int:
        """Tokens in the longest sequence of the data, validation included (tokenises record files first if
        needed): validation keeps the K/V state of its sequences as training does."""
        longest = int(self._ensure_store().lengths.max())
        return max(longest, int(self.val_store.lengths.max())) if self.val_store is not None else longest

    def _resolve_dp(self) -> None:
        rank = self._dp_rank() if callable(self._dp_rank) else self._dp_rank
        size = self._dp_size
        trainer = getattr(self, "trainer", None)
        layout = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        if rank is None:
            rank = layout["rank"] if layout else 0
        if size is None:
            size = layout["num_replicas"] if layout else 1
        if not 0 <= int(rank) < int(size):
            raise ValueError(f"data-parallel rank {rank} is outside [0, {size})")
        self.dp_rank, self.dp_size = int(rank), int(size)

    def train_dataloader(self) -> ResumableLoader:
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self._check_fingerprint(pending)
        sampler = GlobalBatchSampler(len(self.dataset), epoch=self._start_epoch(pending))
        with warnings.catch_warnings():
            # torchdata 0.11 calls a deprecated torch API in its constructor; not actionable here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = ResumableLoader(
                self.dataset,
                batch_size=None,
                sampler=sampler,
                num_workers=self.data.num_workers,
                collate_fn=_keep,
            )
        if pending is not None and pending.get("loader"):
            loader.load_state_dict(pending["loader"])
        self._loader = loader
        return loader

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        """This rank's share of every global batch of the validation set, or ``[]`` (no validation)."""
        if self.dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            return []
        # GlobalBatchSampler counts as a DistributedSampler: Lightning never swaps in its own (each rank must
        # see every global batch and take its share of the chunks itself).
        return torch.utils.data.DataLoader(self.val_dataset, batch_size=None,
                                           sampler=GlobalBatchSampler(len(self.val_dataset)),
                                           num_workers=self.data.num_workers, collate_fn=_keep)

    def _start_epoch(self, pending: dict[str, Any] | None) -> int:
        if pending is not None and "epoch" in pending:
            return int(pending["epoch"])
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.current_epoch)  # restored from the checkpoint before loaders are built
        return 0

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, Any]:
        n = len(self.store) if self.store is not None else None
        return {
            "num_sequences": n,
            "global_batch_size": self.data.global_batch_size,
            "shuffle": self.data.shuffle,
            "seed": self.data.seed,
            "limit_batches": self.limit_batches,
        }

    def state_dict(self) -> dict[str, Any]:
        """Loader position (StatefulDataLoader state) + epoch, enough to resume mid-epoch exactly."""
        if self._loader is None:
            return dict(self._pending_state) if self._pending_state else {}
        sampler = self._loader.sampler
        assert isinstance(sampler, GlobalBatchSampler)
        return {"loader": self._loader.state_dict(), "epoch": sampler.epoch, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until the loader is built (or apply it now if it already is)."""
        if not state_dict:
            return
        self._pending_state = dict(state_dict)
        if self.store is not None:
            self._check_fingerprint(self._pending_state)
        if self._loader is not None:
            pending, self._pending_state = self._pending_state, None
            if pending.get("loader"):
                self._loader.load_state_dict(pending["loader"])
            self._loader.sampler.set_epoch(self._start_epoch(pending))

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        saved, now = state.get("fingerprint", {}), self._fingerprint()
        diff = {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}
        if diff:
            raise ValueError(
                f"cannot resume the data position: the batching changed since the checkpoint "
                f"(saved vs now: {diff}); restore the same data config, or drop the datamodule state "
                f"to start the data from the beginning"
            )

    # ------------------------------------------------------------------ info
    @property
    def num_batches_per_epoch(self) -> int:
        if self.dataset is None:
            self.setup("fit")
        assert self.dataset is not None
        return len(self.dataset)

    @property
    def skipped_records(self) -> int:
        """Bad records skipped under ``data.on_bad_record=skip`` (0 for synthetic data)."""
        return int(getattr(self.store, "skipped_records", 0))

    @property
    def cache_hit(self) -> bool:
        """True when the tokenised cache already existed (nothing was tokenised in this process)."""
        return bool(getattr(self.store, "cache_hit", False)) and not self._tokenized_here
