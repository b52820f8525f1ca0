"""Per-layer activation checkpointing inside kept chunks (``chunk.layer_checkpoint``), applied from outside the model.

``full``: a decoder layer's forward with autograd on (a kept chunk's forward, a chunk's recompute) keeps only
what the layer is called with (its input ``x_TD`` [T, D]; RoPE tables, metadata and prefix views are shared
or the store's) and returns its new keys/values, which the executor holds anyway for the state store; the
rest of the layer is run again in that chunk's backward, one layer at a time (torch's non-reentrant
``checkpoint``)::

    kept chunk, per layer:   none   norms, q, k, v, attention out, MLP (~8 D + Dkv + 4 F per token)
                             full   x_TD (D per token) + its new k, v (Dkv)

Forwards without autograd (dropped chunks, ``kv_only``) run the layer as it is. The layer's class is swapped
for a subclass (as FSDP2's ``fully_shard`` does): no wrapper module, so parameter names
(``layers.3.attn.q_proj.weight``), state dicts and exports are unchanged, and ``__call__`` still runs the
layer's forward hooks (FSDP2's). Apply it before sharding (torchtitan's order).

Composition with the state store (``schedule/executor.py``): the model never writes the store, the executor
writes the keys/values the forward returned, once; the recompute calls the layer with the same prefix
views (the same objects), and its graph is used only to refill saved tensors, so prefix gradients reach
the store once, through the original graph. With a prefix mover (offloaded state on CUDA) the recompute
fetches the layer's prefix again: ``PrefixMover`` serves that fetch and keeps the copy for the layer's
attention backward that follows (``schedule/offload.py``).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from chunkflow_pl.config import LAYER_CHECKPOINT as POLICIES
from chunkflow_pl.model.decoder import DecoderLayer, Qwen2Decoder


class CheckpointedDecoderLayer(DecoderLayer):
    """A ``DecoderLayer`` whose grad-enabled forward is checkpointed; same parameters, same names."""

    def forward(self, x_TD, cos_TD, sin_TD, meta, prefix, backend):
        if not torch.is_grad_enabled():  # a dropped forward: nothing is saved anyway
            return super().forward(x_TD, cos_TD, sin_TD, meta, prefix, backend)
        return checkpoint(super().forward, x_TD, cos_TD, sin_TD, meta, prefix, backend, use_reentrant=False)


def check_policy(policy: str) -> str:
    """``policy`` if it is one of ``POLICIES``, else a ValueError naming the setting."""
    if policy not in POLICIES:
        raise ValueError(f"chunk.layer_checkpoint={policy!r} must be one of {', '.join(POLICIES)}")
    return policy


def apply_layer_checkpoint(model: Qwen2Decoder, policy: str) -> None:
    """Checkpoint each decoder layer of ``model`` (whole or one pipeline stage) per ``policy`` (``POLICIES``);
    ``none`` changes nothing. In place; applying it twice is the same as once."""
    if check_policy(policy) == "none":
        return
    for name, layer in model.layers.items():
        if isinstance(layer, CheckpointedDecoderLayer):
            continue
        if type(layer) is not DecoderLayer:
            raise TypeError(f"layer {name} is a {type(layer).__name__}, not a plain DecoderLayer: apply layer "
                            f"checkpointing before sharding or other wrappers")
        layer.__class__ = CheckpointedDecoderLayer
