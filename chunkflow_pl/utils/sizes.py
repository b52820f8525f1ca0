"""Human sizes for token counts: ``32k`` = 32 * 1024, ``1m`` = 1024**2, plain integers pass through."""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024**2}
ACCEPTED_FORMS = "an integer (4096), or an integer with k/K (x1024) or m/M (x1024^2) suffix: 32k, 256K, 1m"


def parse_size(value: int | str, key: str = "size") -> int:
    """Parse ``value`` into a positive token count; ``key`` names the config field in the error."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a size; expected {ACCEPTED_FORMS}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if m is None:
            raise ValueError(f"{key}={value!r} is not a size; expected {ACCEPTED_FORMS}")
        n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"{key}={value!r} must be positive; expected {ACCEPTED_FORMS}")
    return n


_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)([bB]?)\s*$")
_BYTE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
BYTES_FORMS = "bytes as an integer, or a number with a unit: 75GiB, 512MiB (x1024), 80GB (x1000), 1.5TiB"


def parse_bytes(value: int | float | str, key: str = "memory", allow_zero: bool = False) -> int:
    """Parse a memory amount: ``75GiB`` / ``75G`` = 75 * 1024**3, ``80GB`` = 80 * 1000**3, plain integers are bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a memory amount; expected {BYTES_FORMS}")
    if isinstance(value, int | float):
        n = int(value)
    else:
        m = _BYTES_RE.match(str(value))
        if m is None:
            raise ValueError(f"{key}={value!r} is not a memory amount; expected {BYTES_FORMS}")
        number, unit, binary, b = m.groups()
        # "GB" is decimal; "GiB" and a bare "G" are binary (what free/nvidia-smi users mean by G)
        base = 1000 if (b and not binary and unit) else 1024
        n = int(float(number) * base ** _BYTE_POWERS[unit.lower()])
    if n < 0 or (n == 0 and not allow_zero):
        raise ValueError(f"{key}={value!r} must be {'>= 0' if allow_zero else 'positive'}; expected {BYTES_FORMS}")
    return n


def format_bytes(n: int | float) -> str:
    """``n`` bytes in the largest binary unit that keeps the number >= 1: ``1.00 MiB``, ``75.00 GiB``, ``512 B``."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if abs(n) >= 1024**power:
            return f"{n / 1024**power:.2f} {unit}"
    return f"{int(n)} B"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|min)?\s*$")
_SECONDS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600}
DURATION_FORMS = "seconds as a number (600), or a number with s, m or h: 90s, 10m, 1.5h"


def parse_duration(value: int | float | str, key: str = "timeout") -> float:
    """A positive duration in seconds: ``600``, ``90s``, ``10m``, ``1.5h``; ``key`` names the config field."""
    if isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not a duration; expected {DURATION_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if m is None:
            raise ValueError(f"{key}={value!r} is not a duration; expected {DURATION_FORMS}")
        seconds = float(m.group(1)) * _SECONDS[m.group(2)]
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{key}={value!r} must be a positive duration; expected {DURATION_FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """``600`` -> ``10m``, ``90`` -> ``90s``, ``7200`` -> ``2h``: the form parse_duration reads back."""
    for unit, n in (("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"
