"""Model FLOPs of the decoder, counted from its config (pure arithmetic, no torch).

Matrix products only (norms, RoPE, softmax, SiLU and the loss are O(T D) or O(T V) elementwise work and
are left out, as in the usual MFU convention). One multiply-add = 2 FLOPs. Per token, per layer, forward::

    q_proj, o_proj        2 * (D * D) each              (Hq * Dh = D for Qwen2)
    k_proj, v_proj        2 * (D * Dkv) each            (Dkv = Hkv * Dh)
    gate, up, down        2 * (D * F) each
    -> linear = 2 * (2 D^2 + 2 D Dkv + 3 D F)

    LM head (last stage)  2 * V * D per token (every token: the logits exist for all of them)

Causal attention, per (query, key) pair a segment actually computes, per layer: ``q . k`` over
``Hq * Dh = D`` numbers and ``p . v`` over the same, so ``4 * D`` FLOPs. A segment of ``n`` new tokens
attending to a prefix of ``P`` earlier tokens of its sequence (the chunk's state) computes
``n * P + n (n + 1) / 2`` pairs (``utils/pairs.py``, the one definition of the count, drawn there), so a
sequence cut into any number of chunks counts the same pairs as the whole sequence. Backward
costs twice the forward; "model FLOPs" of a training step = 3 x forward of every token once.

A chunk whose activations are dropped (``chunk.k``) runs forward twice: first without autograd to fill
the state store, later again (the recompute) before its backward. Model FLOPs count one of the two; the
other is extra hardware work. On the last stage that first forward is the executor's ``kv_only`` pass
(``model/decoder.py``): the last layer stops after its k/v projections, so it costs::

    (layers - 1) full layers + 2 * (2 D Dkv) per token of the last layer    (no attention there, no head)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.utils.pairs import causal_pairs

BACKWARD_FACTOR = 2.0  # backward FLOPs / forward FLOPs of a matrix product (input and weight gradients)


def token_pair_counts(segments: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """Total new tokens and causal pairs of segments given as ``(new_tokens, prefix_tokens)``."""
    tokens = pairs = 0
    for n, p in segments:
        tokens += n
        pairs += causal_pairs(n, p)
    return tokens, pairs


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of ``layers`` decoder layers (plus the LM head if ``head``) of one model."""

    linear_per_layer_token: float  # 2 * (2 D^2 + 2 D Dkv + 3 D F)
    kv_per_layer_token: float  # 2 * (2 D Dkv): k_proj and v_proj alone (a key/value-only pass of a layer)
    attn_per_layer_pair: float  # 4 * D
    head_per_token: float  # 2 * V * D, or 0 when this part holds no head
    layers: int

    @classmethod
    def from_config(cls, cfg: ModelConfig, layers: int | None = None, head: bool = True) -> ModelFlops:
        d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
        q = cfg.num_heads * cfg.head_dim
        return cls(
            linear_per_layer_token=2.0 * (d * q + q * d + 2 * d * kv + 3 * d * f),
            kv_per_layer_token=2.0 * (2 * d * kv),
            attn_per_layer_pair=4.0 * q,
            head_per_token=2.0 * cfg.vocab_size * d if head else 0.0,
            layers=cfg.num_layers if layers is None else int(layers),
        )

    @property
    def per_token(self) -> float:
        """Forward FLOPs per token that do not depend on context: all layers' projections + the head."""
        return self.layers * self.linear_per_layer_token + self.head_per_token

    @property
    def per_pair(self) -> float:
        """Forward FLOPs per causal (query, key) pair, all layers."""
        return self.layers * self.attn_per_layer_pair

    def forward(self, segments: Iterable[tuple[int, int]]) -> float:
        """Forward FLOPs of segments given as ``(new_tokens, prefix_tokens)``."""
        tokens, pairs = token_pair_counts(segments)
        return self.per_token * tokens + self.per_pair * pairs

    @property
    def kv_only_per_token(self) -> float:
        """Per-token FLOPs of a ``kv_only`` forward: all layers but the last in full, the last one's k/v."""
        return (self.layers - 1) * self.linear_per_layer_token + self.kv_per_layer_token

    @property
    def kv_only_per_pair(self) -> float:
        """Per-pair FLOPs of a ``kv_only`` forward: the last layer computes no attention."""
        return (self.layers - 1) * self.attn_per_layer_pair

    def dropped_forward(self, segments: Iterable[tuple[int, int]]) -> float:
        """FLOPs of the first forward of a chunk whose activations are dropped: ``kv_only`` where this
        part holds the head (the last stage), a full forward elsewhere (a middle stage sends its output)."""
        if not self.head_per_token:
            return self.forward(segments)
        tokens, pairs = token_pair_counts(segments)
        return self.kv_only_per_token * tokens + self.kv_only_per_pair * pairs

    def train(self, segments: Iterable[tuple[int, int]]) -> float:
        """Model FLOPs of training on these segments: forward + backward (3 x forward)."""
        return (1.0 + BACKWARD_FACTOR) * self.forward(segments)
