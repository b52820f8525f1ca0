"""Pipeline stages of the decoder: which layers each stage builds (pure arithmetic, no torch).

``split_stages(num_layers=7, pp=3)``::

    stage 0   embed + layers 0 1 2          takes token ids
    stage 1   layers 3 4
    stage 2   layers 5 6 + norm + head      computes the loss (and holds embed.weight too if tied)

Layers are split as evenly as possible; the earlier stages take the remainder, since the last one also
runs the LM head and the loss.
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
