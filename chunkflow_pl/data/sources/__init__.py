"""Where sequences come from: a ``TokenStore`` gives the tokens (and optional HF-style labels) of
sequence ``i`` and all lengths up front, so batches can be planned from lengths alone.

Stores: ``synthetic.SyntheticStore`` (generated, lazy) and ``cache.CachedStore`` (memory-mapped
tokenised records, built by ``records`` + ``tokenize``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

ON_BAD_RECORD_HINT = "fix the record, or set data.on_bad_record=skip to skip (and count) bad records"


class DataError(ValueError):
    """Bad input data. The message names the file, the 1-based line (row for parquet), the field,
    and how to fix or skip it."""


def record_error(file: str, line: int | None, field: str | None, problem: str, unit: str = "line") -> DataError:
    where = file if line is None else f"{file}:{line}" if unit == "line" else f"{file} {unit} {line}"
    what = f" field '{field}'" if field else ""
    return DataError(f"{where}:{what} {problem}; {ON_BAD_RECORD_HINT}")


@runtime_checkable
class TokenStore(Protocol):
    """Random access to tokenised sequences. ``labels(i)`` follows the Hugging Face convention
    (aligned with ``tokens(i)``, -100 = not supervised); ``None`` means every token is supervised."""

    @property
    def lengths(self) -> np.ndarray: ...  # int64 [N]

    def __len__(self) -> int: ...

    def tokens(self, i: int) -> np.ndarray: ...

    def labels(self, i: int) -> np.ndarray | None: ...
