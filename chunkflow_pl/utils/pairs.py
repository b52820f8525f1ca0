"""Causal (query, key) pairs of a segment that attends to a prefix: the one definition of the count.

The data-parallel balance (``data/balance.py``) and the FLOP count (``model/flops.py``) both need it and
may not import each other, so it lives here. A segment of ``n`` new tokens after a prefix of ``P``
earlier tokens of its sequence (its query ``i`` sees ``P + i + 1`` keys)::

    keys ->    prefix P        own n (causal)
    query 0    ##########      #
    query 1    ##########      ##                  pairs = n * P + n (n + 1) / 2
    query 2    ##########      ###

so a sequence cut into any number of segments counts the same pairs as the whole sequence.
"""

from __future__ import annotations


def causal_pairs(new_tokens: int, prefix: int) -> int:
    """(query, key) pairs of ``new_tokens`` queries attending causally to themselves and a ``prefix``."""
    return new_tokens * prefix + new_tokens * (new_tokens + 1) // 2
