"""Tokenise record files once, into a memory-mapped cache on disk; reuse it on every later run.

Layout of one cache entry (a directory, renamed into place only when complete, so a crash never
leaves a half-written cache that looks valid)::

    <cache_root>/<kind>-<stem>-<key>/
        tokens.npy   int32 [total_tokens]   all sequences back to back
        offsets.npy  int64 [N + 1]          sequence i = tokens[offsets[i]:offsets[i+1]]
        labels.npy   int32 [total_tokens]   HF-style labels (-100 = unsupervised); absent when every
                                            token is supervised
        lines.npy    int64 [N]              1-based line (row) of each kept record, for messages
        files.npy    int32 [N]              index into meta["files"]
        meta.json    sources, counts, skipped records

``key`` hashes everything the content depends on: absolute path, size and mtime of every source
file, the tokenizer files, kind, train_on, vocab_size, max_len and on_bad_record (a cache built while
skipping bad records must not satisfy a run that asked to stop on them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from chunkflow_pl.data.sources import DataError, record_error
from chunkflow_pl.data.sources.records import (
    RawRecord,
    check_files,
    check_ids_in_vocab,
    decode_record,
    iter_raw_records,
    location_unit,
    validate_chat,
    validate_text,
    validate_tokenized,
)
from chunkflow_pl.data.tokenize import encode_chat, encode_text, load_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_BATCH = 256  # records per task sent to a tokenisation worker
_AUTO_WORKERS_MIN_BYTES = 16 << 20  # below this, process start-up costs more than it saves
_COPY_BLOCK = 1 << 24


@dataclass(frozen=True)
class SourceSpec:
    """What a cache entry is built from (the narrow slice of ``DataConfig`` the cache needs)."""

    kind: str  # "jsonl" | "text" | "chat"
    paths: tuple[str, ...]
    tokenizer: str | None
    train_on: str
    vocab_size: int | None  # None: no range check (e.g. the stats command)
    on_bad_record: str
    max_len: int | None = None  # longest sequence the model accepts (max_position_embeddings); None: no check


# ----------------------------------------------------------------------------------------- encoding
class RecordEncoder:
    """Raw record -> (input_ids, labels | None) as int32 arrays, or ``DataError``."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.tok = load_tokenizer(spec.tokenizer) if spec.kind in ("text", "chat") else None

    def __call__(self, raw: RawRecord) -> tuple[np.ndarray, np.ndarray | None]:
        spec = self.spec
        path = spec.paths[raw.file_index]
        unit = location_unit(path)
        rec = decode_record(raw, path)
        if spec.kind == "jsonl":
            ids, labels = validate_tokenized(rec, path, raw.line, spec.vocab_size)
            field = "labels" if labels is not None else "input_ids"
        elif spec.kind == "text":
            ids, labels, field = encode_text(self.tok, validate_text(rec, path, raw.line)), None, "text"
        else:
            msgs = validate_chat(rec, path, raw.line)
            field = "messages"
            try:
                ids, labels = encode_chat(self.tok, msgs, spec.train_on)
            except DataError:
                raise
            except Exception as e:  # template / tokenizer problems on this record: add the location
                raise record_error(path, raw.line, field, str(e), unit) from e
        if spec.kind != "jsonl" and spec.vocab_size is not None:
            try:
                check_ids_in_vocab(ids, spec.vocab_size, path, raw.line, field, unit)
            except DataError as e:
                raise DataError(f"{e} (does data.tokenizer match the model?)") from None
        if spec.max_len is not None and len(ids) > spec.max_len:
            raise record_error(path, raw.line, field, f"has {len(ids)} tokens, more than the model's "
                               f"max_position_embeddings={spec.max_len}; drop or split the record, or raise the limit "
                               f"(model.overrides.max_position_embeddings, or config.json of model.pretrained)", unit)
        # supervised = has a next-token target: some label after the first is not -100
        sup = labels if labels is not None else ids
        if len(ids) < 2 or all(x == -100 for x in sup[1:]):
            why = (
                "no assistant turn to learn from"
                if spec.kind == "chat"
                else "no token after the first is supervised (labels are -100), so there is nothing to predict"
            )
            raise record_error(path, raw.line, field, f"has no supervised token: {why}", unit)
        ids_a = np.asarray(ids, dtype=np.int32)
        return ids_a, None if labels is None else np.asarray(labels, dtype=np.int32)


_worker_encoder: RecordEncoder | None = None


def _init_worker(spec: SourceSpec) -> None:
    global _worker_encoder
    _worker_encoder = RecordEncoder(spec)


def _encode_batch(batch: list[RawRecord]) -> list[tuple[RawRecord, Any, Any, str | None]]:
    assert _worker_encoder is not None
    return [_encode_one(_worker_encoder, raw) for raw in batch]


def _encode_one(enc: RecordEncoder, raw: RawRecord) -> tuple[RawRecord, Any, Any, str | None]:
    try:
        ids, labels = enc(raw)
    except DataError as e:
        return raw, None, None, str(e)
    return raw, ids, labels, None


def _batched(it: Iterable[RawRecord], n: int) -> Iterator[list[RawRecord]]:
    it = iter(it)
    while batch := list(islice(it, n)):
        yield batch


# ----------------------------------------------------------------------------------------- keying
def cache_key(spec: SourceSpec) -> str:
    check_files(spec.paths)
    h = hashlib.sha256()
    parts: list[Any] = [CACHE_VERSION, spec.kind, spec.train_on, spec.vocab_size, spec.on_bad_record, spec.max_len]
    for p in spec.paths:
        st = os.stat(p)
        parts.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    parts.append(tokenizer_fingerprint(spec.tokenizer) if spec.kind in ("text", "chat") and spec.tokenizer else None)
    h.update(json.dumps(parts).encode())
    return h.hexdigest()[:20]


def cache_entry_dir(spec: SourceSpec, cache_root: Path) -> Path:
    stem = Path(spec.paths[0]).stem[:40] if spec.paths else "data"
    return cache_root / f"{spec.kind}-{stem}-{cache_key(spec)}"


# ----------------------------------------------------------------------------------------- build
def build_cache(spec: SourceSpec, cache_root: Path, workers: int | None = None) -> Path:
    """Build the cache entry for ``spec`` unless it exists; return its directory."""
    final = cache_entry_dir(spec, cache_root)
    if (final / "meta.json").is_file():
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}", dir=cache_root))
    try:
        _write_entry(spec, tmp, _resolve_workers(spec, workers))
        try:
            os.rename(tmp, final)  # atomic publish
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            log.info("cache %s was built concurrently by another process; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_workers(spec: SourceSpec, workers: int | None) -> int:
    if workers is not None:
        return workers
    total = sum(os.path.getsize(p) for p in spec.paths)
    return min(8, os.cpu_count() or 1) if total >= _AUTO_WORKERS_MIN_BYTES else 0


def _results(spec: SourceSpec, workers: int) -> Iterator[tuple[RawRecord, Any, Any, str | None]]:
    records = iter_raw_records(spec.paths, on_empty_file="skip" if spec.on_bad_record == "skip" else "error")
    if workers <= 0:
        enc = RecordEncoder(spec)
        for raw in records:
            yield _encode_one(enc, raw)
        return
    # fork where available (as torch's DataLoader does): workers start in milliseconds instead of
    # re-importing transformers (seconds each); the parent never loads the tokenizer before forking
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        for out in pool.imap(_encode_batch, _batched(records, _BATCH)):
            yield from out


def _write_entry(spec: SourceSpec, out: Path, workers: int) -> None:
    from tqdm.auto import tqdm

    offsets = [0]
    lines: list[int] = []
    files: list[int] = []
    any_labels = False
    skipped = 0
    first_errors: list[str] = []
    tok_bin, lab_bin = out / "tokens.bin", out / "labels.bin"
    bar = tqdm(desc=f"tokenising {spec.kind} records", unit="rec", disable=None, mininterval=1.0)
    # closing(): on an error the worker pool is shut down now, not when the traceback is freed
    results = contextlib.closing(_results(spec, workers))
    with open(tok_bin, "wb") as ft, open(lab_bin, "wb") as fl, results as it, bar:
        for raw, ids, labels, err in it:
            bar.update(1)
            if err is not None:
                if spec.on_bad_record == "error":
                    raise DataError(err)
                skipped += 1
                if len(first_errors) < 5:
                    first_errors.append(err)
                continue
            ft.write(ids.tobytes())
            # labels are written for every record (ids where absent) and dropped at the end if unused
            any_labels |= labels is not None
            fl.write((ids if labels is None else labels).tobytes())
            offsets.append(offsets[-1] + len(ids))
            lines.append(raw.line)
            files.append(raw.file_index)
    if not lines:
        raise DataError(
            f"no usable records in {', '.join(spec.paths)} ({skipped} bad records skipped); check data.path"
        )
    n_tok = offsets[-1]
    _bin_to_npy(tok_bin, out / "tokens.npy", n_tok)
    if any_labels:
        _bin_to_npy(lab_bin, out / "labels.npy", n_tok)
    lab_bin.unlink(missing_ok=True)
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    np.save(out / "lines.npy", np.asarray(lines, dtype=np.int64))
    np.save(out / "files.npy", np.asarray(files, dtype=np.int32))
    meta = {
        "version": CACHE_VERSION,
        "kind": spec.kind,
        "files": [os.path.abspath(p) for p in spec.paths],
        "num_records": len(lines),
        "num_tokens": n_tok,
        "has_labels": any_labels,
        "skipped_records": skipped,
        "first_errors": first_errors,
    }
    # meta.json last: its presence marks a complete entry
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _bin_to_npy(src: Path, dst: Path, n: int) -> None:
    raw = np.memmap(src, dtype=np.int32, mode="r", shape=(n,))
    arr = np.lib.format.open_memmap(dst, mode="w+", dtype=np.int32, shape=(n,))
    for s in range(0, n, _COPY_BLOCK):
        arr[s : s + _COPY_BLOCK] = raw[s : s + _COPY_BLOCK]
    arr.flush()
    del arr, raw
    src.unlink()


# ----------------------------------------------------------------------------------------- load
class CachedStore:
    """``TokenStore`` over a cache entry. Arrays are memory-mapped lazily in each process (so
    pickling the store into DataLoader workers sends paths, not data)."""

    def __init__(self, entry: Path, cache_hit: bool = False) -> None:
        self.entry = Path(entry)
        self.meta = json.loads((self.entry / "meta.json").read_text())
        self.cache_hit = cache_hit
        self.skipped_records = int(self.meta["skipped_records"])
        self._offsets = np.load(self.entry / "offsets.npy")
        self._lengths = np.diff(self._offsets)
        self._tokens: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def _open(self) -> None:
        self._tokens = np.load(self.entry / "tokens.npy", mmap_mode="r")
        if self.meta["has_labels"]:
            self._labels = np.load(self.entry / "labels.npy", mmap_mode="r")

    def tokens(self, i: int) -> np.ndarray:
        if self._tokens is None:
            self._open()
        assert self._tokens is not None
        return np.asarray(self._tokens[self._offsets[i] : self._offsets[i + 1]])

    def labels(self, i: int) -> np.ndarray | None:
        if self._tokens is None:
            self._open()
        if self._labels is None:
            return None
        return np.asarray(self._labels[self._offsets[i] : self._offsets[i + 1]])

    def location(self, i: int) -> str:
        """``file:line`` of sequence ``i`` (for messages)."""
        files = np.load(self.entry / "files.npy", mmap_mode="r")
        lines = np.load(self.entry / "lines.npy", mmap_mode="r")
        return f"{self.meta['files'][int(files[i])]}:{int(lines[i])}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokens"] = state["_labels"] = None
        return state


def load_cached_store(spec: SourceSpec, cache_root: Path, workers: int | None = None) -> CachedStore:
    """Open the cache for ``spec``, building it first if needed; warn about skipped records."""
    entry = cache_entry_dir(spec, cache_root)
    hit = (entry / "meta.json").is_file()
    if not hit:
        build_cache(spec, cache_root, workers)
    store = CachedStore(entry, cache_hit=hit)
    if store.skipped_records:
        log.warning(
            "skipped %d bad records in %s (data.on_bad_record=skip); first: %s",
            store.skipped_records,
            ", ".join(spec.paths),
            " | ".join(store.meta["first_errors"][:3]),
        )
    return store
