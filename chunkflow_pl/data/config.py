"""``DataConfig``: the typed boundary built from the Hydra ``data`` group.

Library code receives this dataclass, never the whole Hydra config. Every field is validated in
``__post_init__`` so a bad value fails at start-up with the key name, not deep inside a worker.

Where the tokenised cache lives (``cache_dir``): ``None`` means ``$CHUNKFLOW_CACHE`` if set, else
``$XDG_CACHE_HOME/chunkflow_pl/tokenized`` (``~/.cache/chunkflow_pl/tokenized``). A home cache rather
than the data file's directory, because data directories are often read-only or shared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chunkflow_pl.utils.sizes import parse_size
from chunkflow_pl.utils.typed_config import from_dict

KINDS = ("synthetic", "jsonl", "text", "chat")
TRAIN_ON = ("assistant", "all")
ON_BAD_RECORD = ("error", "skip")
VAL_POSITION_BUCKETS = (4 * 1024, 16 * 1024, 64 * 1024, 256 * 1024)  # 0-4K, 4K-16K, 16K-64K, 64K-256K, >256K
SYNTHETIC_ONLY = {"num_sequences": 2000, "max_len": "8k", "min_len": 2}  # data.kind=synthetic's keys, defaults


@dataclass
class DataConfig:
    """Everything the data pipeline needs. ``vocab_size`` and ``chunk.size`` come from the model and
    chunk groups and are passed to the datamodule separately.

    kind:              "synthetic" (generated long-tail data), "jsonl" (pre-tokenised records
                       ``{"input_ids": [...], "labels": [...]?}``), "text" (``{"text": ...}``) or
                       "chat" (``{"messages": [{"role", "content"}, ...]}``).
    path:              file or list of files (.jsonl or .parquet); not used by "synthetic".
    tokenizer:         local Hugging Face tokenizer directory, for "text" and "chat".
    train_on:          "assistant" (chat: only assistant turns are supervised) or "all".
    global_batch_size: sequences per optimizer step, over all data-parallel ranks.
    shuffle, seed:     per-epoch permutation seeded by ``seed + epoch``; ``seed`` also drives the
                       synthetic generator.
    num_workers:       DataLoader worker processes (0 = build batches in the training process).
    tokenize_workers:  processes for the one-off tokenisation (None = automatic: up to 8 for big
                       inputs, in-process for small ones; 0 = in-process).
    on_bad_record:     "error" (default: stop with file/line/field) or "skip" (skip, count, warn).
    cache_dir:         where tokenised caches are written (see the module docstring).
    num_sequences, max_len, min_len: synthetic data size and length range; sizes accept ``8k``. Only for
                       "synthetic" (defaults 2000, 8k, 2): set with another kind they are an error, not ignored.
    val_path:          validation file(s), same kind and formats as ``path`` (not with "synthetic").
    val_fraction:      instead of ``val_path``: this share of the training sequences (0 < f < 1) held out for
                       validation, the same ones on every run with the same ``seed`` (synthetic data too).
    val_position_buckets: upper edges of the position buckets of ``val/loss_by_position`` (sizes, increasing):
                       the default ``[4k, 16k, 64k, 256k]`` gives 0-4K, 4K-16K, 16K-64K, 64K-256K, >256K.
    """

    kind: str = "synthetic"
    path: str | list[str] | None = None
    tokenizer: str | None = None
    train_on: str = "assistant"
    global_batch_size: int = 16
    shuffle: bool = True
    seed: int = 1234
    num_workers: int = 0
    tokenize_workers: int | None = None
    on_bad_record: str = "error"
    cache_dir: str | None = None
    num_sequences: int | None = None
    max_len: int | str | None = None
    min_len: int | str | None = None
    val_path: str | list[str] | None = None
    val_fraction: float | None = None
    val_position_buckets: list[int | str] = field(default_factory=lambda: list(VAL_POSITION_BUCKETS))
    paths: list[str] = field(init=False, repr=False, default_factory=list)
    val_paths: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        _choice("data.kind", self.kind, KINDS)
        _choice("data.train_on", self.train_on, TRAIN_ON)
        _choice("data.on_bad_record", self.on_bad_record, ON_BAD_RECORD)
        given = [k for k in SYNTHETIC_ONLY if getattr(self, k) is not None]
        if self.kind != "synthetic" and given:
            raise ValueError(f"data.{given[0]} applies only to data.kind=synthetic (generated data), not "
                             f"data.kind={self.kind}, whose lengths are the records'; remove it")
        for k, default in SYNTHETIC_ONLY.items():
            if getattr(self, k) is None:
                setattr(self, k, default)
        self.max_len = parse_size(self.max_len, key="data.max_len")
        self.min_len = parse_size(self.min_len, key="data.min_len")
        if self.min_len > self.max_len:
            raise ValueError(f"data.min_len={self.min_len} is larger than data.max_len={self.max_len}")
        _positive_int("data.global_batch_size", self.global_batch_size)
        _positive_int("data.num_sequences", self.num_sequences)
        _int("data.seed", self.seed)
        _int("data.num_workers", self.num_workers, minimum=0)
        if self.tokenize_workers is not None:
            _int("data.tokenize_workers", self.tokenize_workers, minimum=0)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"data.shuffle={self.shuffle!r} must be true or false")

        self.paths = _path_list(self.path)
        self._check_validation()
        if self.kind != "synthetic":
            if not self.paths or any(p in ("", "???") for p in self.paths):
                raise ValueError(
                    f"data.kind={self.kind} needs data.path: a .jsonl or .parquet file or a list of them, "
                    f"e.g. data.path=/data/train.jsonl"
                )
            for p in self.paths:
                if not p.endswith((".jsonl", ".parquet")):
                    raise ValueError(f"data.path entry {p!r}: expected a .jsonl or .parquet file")
        if self.kind in ("text", "chat") and (not self.tokenizer or self.tokenizer == "???"):
            raise ValueError(
                f"data.kind={self.kind} needs data.tokenizer: a local Hugging Face tokenizer directory "
                f"(e.g. the model checkpoint dir holding tokenizer.json); nothing is downloaded"
            )

    def _check_validation(self) -> None:
        self.val_paths = _path_list(self.val_path)
        if self.val_paths and self.val_fraction is not None:
            raise ValueError("data.val_path and data.val_fraction both set: validate on a file or on a held-out "
                             "share of the training data, not both")
        if self.val_paths and self.kind == "synthetic":
            raise ValueError("data.val_path needs record files (data=jsonl|text|chat); with synthetic data hold "
                             "out a share instead: data.val_fraction=0.05")
        for p in self.val_paths:
            if not p.endswith((".jsonl", ".parquet")):
                raise ValueError(f"data.val_path entry {p!r}: expected a .jsonl or .parquet file")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be between 0 and 1 (exclusive), "
                             f"e.g. 0.05")
        if not isinstance(self.val_position_buckets, list | tuple) or not self.val_position_buckets:
            raise ValueError(f"data.val_position_buckets={self.val_position_buckets!r} must be a non-empty list of "
                             f"sizes, e.g. [4k,16k,64k,256k]")
        edges = [parse_size(v, key=f"data.val_position_buckets[{i}]")
                 for i, v in enumerate(self.val_position_buckets)]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"data.val_position_buckets={edges} must be strictly increasing")
        self.val_position_buckets = edges

    @property
    def has_validation(self) -> bool:
        return bool(self.val_paths) or self.val_fraction is not None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Build from the Hydra ``data`` group (a dict or DictConfig); unknown keys are an error."""
        return from_dict(cls, d, "data")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        if os.environ.get("CHUNKFLOW_CACHE"):
            return Path(os.environ["CHUNKFLOW_CACHE"]).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        return Path(base).expanduser() / "chunkflow_pl" / "tokenized"


def _path_list(raw: object) -> list[str]:
    # OmegaConf hands lists over as ListConfig: normalise to a list of str.
    if raw is None or raw == "":
        return []
    if isinstance(raw, str | os.PathLike):
        return [str(raw)]
    return [str(p) for p in raw]


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _int(key: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}={value} must be >= {minimum}")


def _positive_int(key: str, value: object) -> None:
    _int(key, value, minimum=1)
