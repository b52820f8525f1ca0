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
