"""Read and validate records from JSONL and Parquet files (same columns in both).

Record kinds (Hugging Face conventions)::

    jsonl  {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}   labels optional, aligned with
                                                               input_ids, -100 = not supervised
    text   {"text": "..."}                                     tokenised; every token supervised
    chat   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Other fields are ignored (records often carry ids or metadata). This module knows nothing of
tokenisers: it yields raw records with their location and checks their structure, so a bad record
is reported as ``file:line: field 'x': problem; how to fix or skip``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from chunkflow_pl.data.sources import DataError, record_error

CHAT_ROLES = ("system", "user", "assistant")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawRecord:
    """One undecoded record: a JSONL line (decoded in the worker) or a Parquet row as a dict."""

    file_index: int
    line: int  # 1-based line (JSONL) or row (Parquet)
    payload: bytes | str | dict


def location_unit(path: str) -> str:
    return "row" if path.endswith(".parquet") else "line"


def check_files(paths: Sequence[str]) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"{p}: file not found; check data.path (a .jsonl or .parquet file or a list)")


def iter_raw_records(paths: Sequence[str], on_empty_file: str = "error") -> Iterator[RawRecord]:
    """Yield every record of every file in order. Blank JSONL lines are not records. An empty file
    raises ``DataError`` (``on_empty_file="error"``) or is skipped with nothing yielded."""
    check_files(paths)
    for fi, path in enumerate(paths):
        n = 0
        it = _iter_parquet(path) if path.endswith(".parquet") else _iter_jsonl(path)
        for line, payload in it:
            n += 1
            yield RawRecord(fi, line, payload)
        if n == 0:
            if on_empty_file == "error":
                raise DataError(
                    f"{path}: file is empty (no records); remove it from data.path, or set "
                    f"data.on_bad_record=skip to skip empty files and bad records"
                )
            log.warning("%s: file is empty (no records); skipped (data.on_bad_record=skip)", path)


def _iter_jsonl(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line. Lines are split in binary and decoded one by
    one later (``decode_record``): a bad byte is then reported on its own line and can be skipped like
    any other bad record (a text-mode reader decodes ahead in blocks and fails lines early)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def _iter_parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({e}); check the file or data.path") from e
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def decode_record(raw: RawRecord, path: str) -> dict[str, Any]:
    """JSON-decode a JSONL line (Parquet rows are already dicts); the top level must be an object."""
    unit = location_unit(path)
    if isinstance(raw.payload, dict):
        return raw.payload
    text = raw.payload
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = text[e.start : e.start + 1].hex()
            raise record_error(path, raw.line, None, f"not valid UTF-8 (byte 0x{bad} at byte {e.start + 1} of the "
                                                     f"line: {e.reason})", unit) from e
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise record_error(path, raw.line, None, f"malformed JSON ({e.msg} at column {e.colno})", unit) from e
    if not isinstance(rec, dict):
        raise record_error(path, raw.line, None, f"record is a JSON {type(rec).__name__}, expected an object", unit)
    return rec


def _int_list(rec: dict, key: str, path: str, line: int, unit: str, required: bool) -> list[int] | None:
    v = rec.get(key)
    if v is None:
        if required:
            raise record_error(path, line, key, "missing (expected a list of token ids)", unit)
        return None
    if hasattr(v, "tolist"):  # numpy arrays from Parquet list columns
        v = v.tolist()
    if not isinstance(v, list):
        raise record_error(path, line, key, f"is a {type(v).__name__}, expected a list of integers", unit)
    for j, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int):
            raise record_error(path, line, f"{key}[{j}]", f"is {x!r}, expected an integer", unit)
    return v


def validate_tokenized(rec: dict, path: str, line: int, vocab_size: int | None) -> tuple[list[int], list[int] | None]:
    """``{"input_ids", "labels"?}`` -> (ids, labels); ids in [0, vocab), labels -100 or in range."""
    unit = location_unit(path)
    ids = _int_list(rec, "input_ids", path, line, unit, required=True)
    assert ids is not None
    if not ids:
        raise record_error(path, line, "input_ids", "is empty", unit)
    labels = _int_list(rec, "labels", path, line, unit, required=False)
    if labels is not None and len(labels) != len(ids):
        raise record_error(
            path, line, "labels", f"has {len(labels)} entries but input_ids has {len(ids)}; they must align", unit
        )
    if vocab_size is not None:
        check_ids_in_vocab(ids, vocab_size, path, line, "input_ids", unit)
        if labels is not None:
            for j, x in enumerate(labels):
                if x != -100 and not 0 <= x < vocab_size:
                    raise record_error(
                        path, line, f"labels[{j}]", f"= {x} is neither -100 nor a token id in [0, {vocab_size})", unit
                    )
    return ids, labels


def check_ids_in_vocab(ids: Sequence[int], vocab_size: int, path: str, line: int, field: str, unit: str) -> None:
    for j, x in enumerate(ids):
        if not 0 <= x < vocab_size:
            raise record_error(
                path, line, f"{field}[{j}]", f"token id {x} is outside the model vocabulary [0, {vocab_size})", unit
            )


def validate_text(rec: dict, path: str, line: int) -> str:
    unit = location_unit(path)
    v = rec.get("text")
    if v is None:
        raise record_error(path, line, "text", "missing (expected a string)", unit)
    if not isinstance(v, str):
        raise record_error(path, line, "text", f"is a {type(v).__name__}, expected a string", unit)
    if not v:
        raise record_error(path, line, "text", "is empty", unit)
    return v


def validate_chat(rec: dict, path: str, line: int) -> list[dict[str, str]]:
    unit = location_unit(path)
    msgs = rec.get("messages")
    if msgs is None:
        raise record_error(path, line, "messages", "missing (expected a list of {role, content})", unit)
    if hasattr(msgs, "tolist"):
        msgs = msgs.tolist()
    if not isinstance(msgs, list):
        raise record_error(path, line, "messages", f"is a {type(msgs).__name__}, expected a list", unit)
    if not msgs:
        raise record_error(path, line, "messages", "is empty", unit)
    out: list[dict[str, str]] = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise record_error(path, line, f"messages[{j}]", f"is a {type(m).__name__}, expected an object", unit)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise record_error(path, line, f"messages[{j}].role", f"is {role!r}, expected a string", unit)
        if role not in CHAT_ROLES:
            expected = ", ".join(CHAT_ROLES)
            raise record_error(
                path, line, f"messages[{j}].role", f"unknown role {role!r}; expected one of {expected}", unit
            )
        if not isinstance(content, str):
            what = type(content).__name__
            raise record_error(path, line, f"messages[{j}].content", f"is {what}, expected a string", unit)
        out.append({"role": role, "content": content})
    return out
