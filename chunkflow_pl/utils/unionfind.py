"""Union-find over ``0 .. n-1``: which chunks are linked by a sequence's chain (data balancing, scheduling)."""

from __future__ import annotations

from collections.abc import Iterable


def connected_groups(n: int, links: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of ``0 .. n-1`` under ``links``; each sorted, listed by smallest member."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees shallow
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in range(n):  # ascending, so members come out sorted and groups ordered by smallest member
        groups.setdefault(root(x), []).append(x)
    return list(groups.values())
