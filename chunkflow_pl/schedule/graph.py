"""Dependency graph of one step's chunks (single device, paper Algorithm 2).

A segment with ``start > 0`` attends to the keys/values of tokens ``[0, start)`` of its sequence,
which the chunk holding the previous piece produced. So, for pieces of one sequence split over
chunks ``0 -> 1 -> 2``::

    forward:   F0 -> F1 -> F2        (F2 reads the keys/values F0 and F1 stored)
    backward:  B2 -> B1 -> B0        (B2 adds to the gradient of that state, so B1 and B0 wait)

Only the edge to the adjacent piece is stored; F0 -> F2 and B2 -> B0 follow transitively.

A chunk that packs the tails of two sequences joins both chains into one *component*. With
sequences ``a`` (11 tokens), ``b`` (13) and ``c`` (5) in chunks of 8 tokens::

    chunk 0: a[0:8)
    chunk 1: b[0:8)
    chunk 2: a[8:11) b[8:13)     forward after F0 and F1; backward before B0 and B1
    chunk 3: c[0:5)              standalone

the components are ``(0, 1, 2)`` and ``(3,)``.

Components matter because a component's key/value state is alive until its last backward; the
scheduler finishes one component before starting the next.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from chunkflow_pl.data.types import Segment
from chunkflow_pl.utils.unionfind import connected_groups


@dataclass(frozen=True)
class ChunkGraph:
    """Dependencies between the chunks of one step.

    ``fwd_deps[c]``: chunks whose forward must run before ``c``'s (they hold earlier pieces).
    ``bwd_deps[c]``: chunks whose backward must run before ``c``'s (they hold later pieces); this is
    ``fwd_deps`` reversed. ``components``: chunks linked by sequence continuation, each sorted, listed
    by smallest member. ``component_of[c]``: index into ``components``.
    """

    num_chunks: int
    fwd_deps: tuple[frozenset[int], ...]
    bwd_deps: tuple[frozenset[int], ...]
    components: tuple[tuple[int, ...], ...]
    component_of: tuple[int, ...]


def build_graph(chunks: Sequence[Sequence[Segment]], seq_lens: Sequence[int]) -> ChunkGraph:
    """Validate ``chunks`` against ``seq_lens`` and derive the dependency graph.

    Every sequence that appears in ``chunks`` must be tiled by its pieces: ``[0, seq_len)`` exactly
    once. Sequences that appear in no chunk are allowed (on a data-parallel rank, ``seq_lens`` covers
    the whole global batch but the chunks only this rank's share). Raises ``ValueError`` on a bad
    tiling or a dependency cycle (including a chunk holding two consecutive pieces of one sequence).
    """
    pieces: dict[int, list[tuple[int, int, int]]] = {}  # seq -> [(start, end, chunk)]
    for c, chunk in enumerate(chunks):
        for seg in chunk:
            if not 0 <= seg.seq < len(seq_lens):
                raise ValueError(f"chunk {c}: segment {seg} names sequence {seg.seq}, not in seq_lens")
            if not 0 <= seg.start < seg.end:
                raise ValueError(f"chunk {c}: segment {seg} of sequence {seg.seq} is empty or negative")
            pieces.setdefault(seg.seq, []).append((seg.start, seg.end, c))

    fwd: list[set[int]] = [set() for _ in chunks]
    for seq, segs in pieces.items():
        segs.sort()
        pos = 0
        prev_chunk = -1
        for start, end, c in segs:
            if start != pos:
                what = f"gap at token {pos}" if start > pos else f"overlap at token {start}"
                raise ValueError(f"sequence {seq}: pieces do not tile [0, {seq_lens[seq]}): {what}")
            if prev_chunk >= 0:
                fwd[c].add(prev_chunk)
            pos, prev_chunk = end, c
        if pos != seq_lens[seq]:
            raise ValueError(f"sequence {seq}: pieces end at token {pos}, but its length is {seq_lens[seq]}")

    bwd: list[set[int]] = [set() for _ in chunks]
    for c, deps in enumerate(fwd):
        for p in deps:
            bwd[p].add(c)

    graph_fwd = tuple(frozenset(d) for d in fwd)
    components, component_of = _components(graph_fwd)
    graph = ChunkGraph(
        num_chunks=len(chunks),
        fwd_deps=graph_fwd,
        bwd_deps=tuple(frozenset(d) for d in bwd),
        components=components,
        component_of=component_of,
    )
    for members in components:  # a cycle lies inside one component; forward_order raises on it
        forward_order(graph, members)
    return graph


def forward_order(graph: ChunkGraph, members: Sequence[int]) -> list[int]:
    """Topological order of ``members`` by forward dependencies; among ready chunks, lowest index first.

    The stable tie-break makes plans reproducible and keeps packed chunks in the data order.
    Dependencies on chunks outside ``members`` are ignored (callers pass a whole component).
    """
    inside = set(members)
    waiting = {c: len(graph.fwd_deps[c] & inside) for c in members}
    ready = [c for c, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        c = heapq.heappop(ready)
        order.append(c)
        for n in graph.bwd_deps[c]:
            if n in inside:
                waiting[n] -= 1
                if waiting[n] == 0:
                    heapq.heappush(ready, n)
    if len(order) != len(inside):
        stuck = sorted(c for c, n in waiting.items() if n > 0)
        raise ValueError(f"dependency cycle among chunks {stuck}")
    return order


def _components(fwd: tuple[frozenset[int], ...]) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    groups = connected_groups(len(fwd), ((c, p) for c, deps in enumerate(fwd) for p in deps))
    components = tuple(tuple(g) for g in groups)
    component_of = [0] * len(fwd)
    for i, members in enumerate(components):
        for c in members:
            component_of[c] = i
    return components, tuple(component_of)
