"""Pipeline stages of the decoder: which layers each stage builds (pure arithmetic, no torch).

``split_stages(num_layers=7, pp=3)``::

    stage 0   embed + layers 0 1 2          takes token ids
    stage 1   layers 3 4
    stage 2   layers 5 6 + norm + head      computes the loss (and holds embed.weight too if tied)

Layers are split as evenly as possible; the earlier stages take the remainder, since the last one also
runs the LM head and the loss.

Virtual stages (``parallel.virtual_stages=v``, interleaved pipelines): the model is cut into ``pp x v``
*blocks* by the same rule (``split_blocks``), and rank ``r`` holds blocks ``r, r + pp, r + 2 pp, ...``
(``rank_blocks``)::

    split_blocks(num_layers=8, pp=2, virtual=2)      rank 0: RankBlocks(ids=(0, 2))   rank 1: ids=(1, 3)
    block 0   embed + layers 0 1      rank 0
    block 1   layers 2 3              rank 1
    block 2   layers 4 5              rank 0
    block 3   layers 6 7 + head       rank 1

A rank's model holds all its blocks' modules under their whole-model names (``Qwen2Decoder(stage=
RankBlocks)``) and runs one block per call; the first rank takes ids (block 0), the last has the head
(block ``pp v - 1``), as with ``v = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    """Which part of the decoder a pipeline stage builds: layers ``[first_layer, end_layer)``.

    The first stage (``takes_ids``) owns the embedding and takes token ids; the last (``has_head``) owns the
    final norm and the LM head and computes the loss; every other stage takes and returns the residual
    stream ``[T, D]``. With tied embeddings the last stage also holds ``embed.weight`` (its head): the
    same parameter name as on the first stage, kept equal by summing the two gradients (strategy). The
    whole model is ``StageSpec.whole(num_layers)``.
    """

    first_layer: int
    end_layer: int
    takes_ids: bool
    has_head: bool

    @classmethod
    def whole(cls, num_layers: int) -> StageSpec:
        return cls(0, num_layers, True, True)

    @property
    def layer_ids(self) -> range:
        return range(self.first_layer, self.end_layer)


@dataclass(frozen=True)
class RankBlocks:
    """The blocks one rank holds with virtual stages: ``ids`` (global block indices, ascending) and their specs.

    Answers what callers ask a ``StageSpec`` about a rank's whole model part: ``takes_ids`` (it holds block 0:
    the embedding), ``has_head`` (it holds the last block: norm, head, loss), ``layer_ids`` (every layer it
    builds, ascending). It has no single layer range: one block runs per call (``Qwen2Decoder.block``).
    """

    ids: tuple[int, ...]
    blocks: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        if not self.blocks or len(self.ids) != len(self.blocks) or list(self.ids) != sorted(set(self.ids)):
            raise ValueError(f"RankBlocks needs one spec per block id, ids ascending: {self.ids}")

    @property
    def takes_ids(self) -> bool:
        return any(b.takes_ids for b in self.blocks)

    @property
    def has_head(self) -> bool:
        return any(b.has_head for b in self.blocks)

    @property
    def layer_ids(self) -> list[int]:
        return [i for b in self.blocks for i in b.layer_ids]

    def spec(self, block: int) -> StageSpec:
        """The spec of global block ``block`` (one of ``ids``)."""
        if block not in self.ids:
            raise ValueError(f"block {block} is not one of this rank's blocks {self.ids}")
        return self.blocks[self.ids.index(block)]


def split_blocks(num_layers: int, pp: int, virtual: int) -> list[StageSpec]:
    """``pp x virtual`` contiguous blocks covering the layers (``split_stages`` with a virtual-stage error)."""
    if virtual < 1:
        raise ValueError(f"parallel.virtual_stages={virtual} must be >= 1")
    if pp * virtual > num_layers:
        raise ValueError(f"parallel.pp x parallel.virtual_stages = {pp} x {virtual} = {pp * virtual} blocks, but the "
                         f"model has {num_layers} layers: each block needs at least one layer; use "
                         f"parallel.virtual_stages <= {max(num_layers // pp, 1)}")
    return split_stages(num_layers, pp * virtual)


def rank_blocks(num_layers: int, pp: int, virtual: int, rank: int) -> RankBlocks:
    """The blocks pipeline rank ``rank`` holds: ``rank, rank + pp, ...`` of ``split_blocks``."""
    if not 0 <= rank < pp:
        raise ValueError(f"pipeline rank {rank} is not one of parallel.pp={pp}")
    specs = split_blocks(num_layers, pp, virtual)
    ids = tuple(range(rank, pp * virtual, pp))
    return RankBlocks(ids, tuple(specs[b] for b in ids))


def split_stages(num_layers: int, pp: int) -> list[StageSpec]:
    """``pp`` contiguous stages covering ``num_layers`` layers, each with at least one layer."""
    if pp < 1:
        raise ValueError(f"parallel.pp={pp} must be >= 1")
    if pp > num_layers:
        raise ValueError(f"parallel.pp={pp} is larger than the model's {num_layers} layers: each pipeline stage "
                         f"needs at least one layer; use parallel.pp <= {num_layers}")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(StageSpec(start, start + n, takes_ids=s == 0, has_head=s == pp - 1))
        start += n
    return out
