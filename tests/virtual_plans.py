"""Valid virtual-stage plans for runtime tests, until the interleaved scheduler exists (``plan_pipeline(virtual>1)``).

``virtual_plan`` takes the ordinary plan of ``pp x virtual`` stages (one per block: 1F1B, chains, recompute, caps,
all checked by ``check_pipeline_plan`` as if each block ran in its own process) and lets each rank run its blocks'
lists interleaved (``interleave_blocks``): a simulation of the ranks where a rank takes, among the next actions of
its blocks, one that can run now (a compute action or a send always can, a receive once its channel's matching
send has run), preferring the deepest block (work nearest the loss first). The lists themselves are unchanged,
so every per-block rule still holds; and since each block's list runs in its own order and every receive waits
for its send in a global order the ranks can follow, the ranks finish (blocking receives, posted sends: what the
P2P transport does). If the per-block plan finishes with one process per block it finishes here: a pipeline with
blocking FIFO receives is a Kahn network, whose runs all end in the same state, so a rank can be stuck only where
the one-process-per-block run would be.
"""

from __future__ import annotations

from collections.abc import Sequence

from chunkflow_pl.schedule.pipeline_actions import Comm, PipeAction, PipelinePlan
from chunkflow_pl.schedule.scheduler import plan_pipeline as plan_blocks


def interleave_blocks(stages: Sequence[Sequence[PipeAction]], ranks: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``PipelinePlan.order`` for per-block lists ``stages`` (block ``b`` on rank ``b % ranks``)."""
    nblocks = len(stages)
    pos = [0] * nblocks
    sends: dict[tuple[str, int, int], int] = {}  # channel -> sends run so far
    recvs: dict[tuple[str, int, int], int] = {}
    order: list[list[tuple[int, int]]] = [[] for _ in range(ranks)]
    left = sum(len(s) for s in stages)

    def ready(b: int) -> bool:
        a = stages[b][pos[b]]
        if not isinstance(a, Comm) or a.is_send:
            return True
        ch = a.channel(b)
        return sends.get(ch, 0) > recvs.get(ch, 0)

    while left:
        moved = False
        for r in range(ranks):
            heads = [b for b in range(r, nblocks, ranks) if pos[b] < len(stages[b]) and ready(b)]
            if not heads:
                continue
            b = max(heads)
            a = stages[b][pos[b]]
            if isinstance(a, Comm):
                book = sends if a.is_send else recvs
                book[a.channel(b)] = book.get(a.channel(b), 0) + 1
            order[r].append((b, pos[b]))
            pos[b] += 1
            left -= 1
            moved = True
        if not moved:
            raise ValueError(f"the block lists cannot finish when each rank runs its blocks one at a time: "
                             f"next actions {[str(s[p]) if p < len(s) else '-' for s, p in zip(stages, pos)]}")
    return tuple(tuple(o) for o in order)


def virtual_plan(chunks, seq_lens, pp: int, k: int, *, cost=None, virtual: int = 1, **kw) -> PipelinePlan:
    """A drop-in for ``plan_pipeline`` with ``virtual > 1``: ``pp`` ranks x ``virtual`` blocks (``cost`` per block)."""
    base = plan_blocks(chunks, seq_lens, pp * virtual, k, cost=cost, **kw)
    if virtual == 1:
        return base
    return PipelinePlan(base.stages, base.caps, base.chunk_tokens, virtual=virtual,
                        order=interleave_blocks(base.stages, pp))
