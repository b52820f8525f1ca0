"""The Qwen2 / Qwen2.5 decoder on one device, on a flat packed token batch (THD, no padding); Llama 3.x is
the same decoder without q/k/v biases and with llama3 RoPE scaling (``ModelConfig.architecture``).

    input_ids_T, position_ids_T   [T]        tokens of all segments of a chunk, concatenated
    meta: VarlenMeta                          per segment: query length, prefix length
    prefix_kv[l] = (k_PHD, v_PHD)             layer l's keys/values (after RoPE) of the prefixes: one
                                              concatenated tensor each, or a tuple with one tensor per
                                              prefixed segment (views of the state store, maybe on the host)
    -> hidden_TD [T, D] after the final norm, and (if asked) each layer's new (k_TND, v_TND)

The model knows nothing of chunks beyond "attend to this prefix state": chunking, state passing
and parallelism are applied from outside. Layers live in a ModuleDict keyed "0".."N-1" so parameter
names never change when the model is split into pipeline stages.

Virtual stages: built with ``stage=RankBlocks`` (``model/stages.py``), one module holds the layers of all the
rank's blocks (plus the embedding with block 0, the norm and head with the last block), under the same names;
``forward(..., block=b)`` runs block ``b`` alone, and ``model.block(b)`` is a view of it shaped like a
one-stage model (``stage``, ``layer_names``, call, loss), which is what a block's executor runs.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from chunkflow_pl.model.attention import VarlenMeta, attention
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.loss import chunked_cross_entropy, token_cross_entropy
from chunkflow_pl.model.rope import Llama3Scaling, RotaryTable
from chunkflow_pl.model.stages import RankBlocks, StageSpec

KV = tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | tuple[torch.Tensor, ...]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and self.weight.dtype == x.dtype:
            # One fused kernel when no gradient is taken (dropped forwards); bit-identical to the ops below
            # (and to transformers' Qwen2RMSNorm) in fp32 and fp64, checked in tests/test_model_parity.py.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype  # reduced precision: normalise in fp32, cast back before the weight, as transformers
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def signed_sin(sin_TD: torch.Tensor) -> torch.Tensor:
    """``cat(-sin[:, :D/2], sin[:, D/2:])``: rotate_half's sign folded into the table, once per chunk."""
    out_TD = sin_TD.clone()
    out_TD[:, : sin_TD.shape[-1] // 2].neg_()
    return out_TD


def apply_rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, ssin_TD: torch.Tensor) -> torch.Tensor:
    """``x cos + rotate_half(x) sin`` (transformers' form) with ``ssin_TD = signed_sin(sin_TD)``:
    ``rotate_half(x) sin = cat(x2, x1) ssin`` exactly (a sign flip is exact), one op fewer per call."""
    # Under autocast q/k come out of the projections in bf16 while cos/sin follow the fp32 residual
    # stream: cast so q, k and v share one dtype (the fused kernels require it).
    cos_TD, ssin_TD = cos_TD.to(x_THD.dtype), ssin_TD.to(x_THD.dtype)
    x1, x2 = x_THD.chunk(2, dim=-1)
    return (x_THD * cos_TD[:, None, :]) + (torch.cat((x2, x1), dim=-1) * ssin_TD[:, None, :])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)  # Qwen2: biases; Llama: none
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def kv(self, x_TD, cos_TD, sin_TD) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's new keys/values only (the same ops as in ``forward``, so the same bits)."""
        T = x_TD.shape[0]
        k_THD = self.k_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        v_THD = self.v_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        return apply_rope(k_THD, cos_TD, sin_TD), v_THD

    def forward(self, x_TD, cos_TD, sin_TD, meta: VarlenMeta, prefix: KV | None, backend: str):
        T = x_TD.shape[0]
        q_THD = self.q_proj(x_TD).view(T, self.num_heads, self.head_dim)
        k_THD = self.k_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        v_THD = self.v_proj(x_TD).view(T, self.num_kv_heads, self.head_dim)
        q_THD, k_THD = apply_rope(q_THD, cos_TD, sin_TD), apply_rope(k_THD, cos_TD, sin_TD)
        pk, pv = prefix if prefix is not None else (None, None)
        o_THD = attention(q_THD, k_THD, v_THD, meta, pk, pv, backend=backend)
        return self.o_proj(o_THD.reshape(T, -1)), (k_THD, v_THD)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_TD, cos_TD, sin_TD, meta, prefix, backend):
        a_TD, kv = self.attn(self.attn_norm(x_TD), cos_TD, sin_TD, meta, prefix, backend)
        h_TD = x_TD + a_TD
        return h_TD + self.mlp(self.mlp_norm(h_TD)), kv

    def kv(self, x_TD, cos_TD, sin_TD) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.kv(self.attn_norm(x_TD), cos_TD, sin_TD)


class Qwen2Decoder(nn.Module):
    """Embedding -> N x (RMSNorm, GQA attention (q/k/v bias: Qwen2), RMSNorm, SwiGLU) -> RMSNorm -> LM head.

    Built whole, or as one pipeline stage (``stage``): only that stage's modules exist, under the names
    they have in the whole model (``layers.17.attn.q_proj.weight`` stays that on whatever stage holds
    layer 17), so checkpoints and Hugging Face exports of the stages merge by name. With virtual stages
    ``stage`` is the rank's ``RankBlocks``: its blocks' modules, same names, one block per ``forward``.
    """

    def __init__(self, cfg: ModelConfig, attention_backend: str = "sdpa", loss_chunk: int = 4096,
                 stage: StageSpec | RankBlocks | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage = stage or StageSpec.whole(cfg.num_layers)
        for spec in self.stage.blocks if isinstance(self.stage, RankBlocks) else (self.stage,):
            if not 0 <= spec.first_layer <= spec.end_layer <= cfg.num_layers:
                raise ValueError(f"stage {spec} does not fit a model of {cfg.num_layers} layers")
        self.attention_backend = attention_backend
        self.loss_chunk = loss_chunk
        tied_head = self.stage.has_head and cfg.tie_word_embeddings
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.stage.takes_ids or tied_head else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in self.stage.layer_ids})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.stage.has_head else None
        self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                        if self.stage.has_head and not cfg.tie_word_embeddings else None)
        llama3 = (Llama3Scaling(cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                cfg.rope_original_max_positions) if cfg.rope_type == "llama3" else None)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, llama3)  # host-side table, not a parameter or buffer

    @property
    def layer_names(self) -> list[str]:
        """Keys of this stage's layers (global layer indices as strings), in order (every block's, with virtual
        stages)."""
        return list(self.layers.keys())

    def block(self, block: int) -> DecoderBlock:
        """Global block ``block`` of a rank holding virtual stages (``stage`` is a ``RankBlocks``), as a model."""
        if not isinstance(self.stage, RankBlocks):
            raise ValueError(f"block {block} of a model built as one stage ({self.stage}): only a model built with "
                             "stage=RankBlocks (parallel.virtual_stages > 1) has blocks")
        return DecoderBlock(self, block)

    @property
    def head_weight(self) -> torch.Tensor:
        if not self.stage.has_head:
            raise RuntimeError(f"stage {self.stage} has no LM head")
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init, identical on every stage for the parameters it holds.

        Each parameter draws from its own generator seeded by (seed, its name), so a stage gets exactly
        the values the whole model would (and a tied head on the last stage equals the first stage's
        embedding) whatever the split.
        """
        # One draw from the given (or the global, seeded) generator: the same on every rank.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    g = torch.Generator(device=p.device).manual_seed(name_seed(seed, name))
                    p.normal_(0.0, std, generator=g)

    def forward(
        self,
        x: torch.Tensor,
        position_ids_T: torch.Tensor,
        meta: VarlenMeta,
        prefix_kv: list[KV] | None = None,
        return_kv: bool = False,
        kv_only: bool = False,
        block: int | None = None,
    ) -> tuple[torch.Tensor | None, list[KV] | None]:
        """This stage's layers on one chunk (with virtual stages: block ``block``'s layers, and "stage" below
        means that block).

        ``x``: token ids ``input_ids_T`` [T] on the first stage, else the residual stream ``x_TD`` [T, D].
        ``prefix_kv[i]``: prefix keys/values of this stage's ``i``-th layer (``layer_names[i]``).
        Returns the normed hidden state on the last stage (feed it to ``loss_sum``), else the residual
        stream for the next stage; plus each layer's new ``(k_TND, v_TND)`` if ``return_kv``.

        ``kv_only`` (last stage, with ``return_kv``): only the keys/values are wanted (a forward whose
        activations are dropped, run to fill the state store): the last layer stops after its k/v
        projections (no attention, o_proj, MLP or final norm) and the hidden state returned is None.
        The keys/values are bit-identical to a full forward's.
        """
        spec, layers = self._block_layers(block)
        if kv_only and not (return_kv and spec.has_head):
            raise ValueError("kv_only needs return_kv=True on the last stage (a middle stage must send its output)")
        x_TD = self.embed(x) if spec.takes_ids else x
        # Positions of segment b are prefix_b .. prefix_b + len_b - 1: the table size is known without a sync.
        num_positions = max((p + q for p, q in zip(meta.prefix_lens, meta.seqlens_q)), default=0)
        cos_TD, sin_TD = self.rope.cos_sin(position_ids_T, num_positions, x_TD.dtype)
        sin_TD = signed_sin(sin_TD)  # the layers take the signed form (apply_rope)
        new_kv: list[KV] = []
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            if kv_only and i == last:
                new_kv.append(layer.kv(x_TD, cos_TD, sin_TD))
                return None, new_kv
            prefix = prefix_kv[i] if prefix_kv is not None else None
            x_TD, kv = layer(x_TD, cos_TD, sin_TD, meta, prefix, self.attention_backend)
            if return_kv:
                new_kv.append(kv)
        out = self.norm(x_TD) if spec.has_head else x_TD
        return out, (new_kv if return_kv else None)

    def _block_layers(self, block: int | None) -> tuple[StageSpec, list[nn.Module]]:
        """The spec and layers ``forward`` runs: the stage's, or block ``block``'s (looked up by name at each call,
        so a layer wrapped later, by checkpointing or sharding, is the one that runs)."""
        if block is None:
            if isinstance(self.stage, RankBlocks):
                raise ValueError(f"a rank holding blocks {self.stage.ids} (virtual stages) runs one block per call: "
                                 "pass block=")
            return self.stage, list(self.layers.values())
        if not isinstance(self.stage, RankBlocks):
            raise ValueError(f"block={block} on a model built as one stage ({self.stage})")
        spec = self.stage.spec(block)
        return spec, [self.layers[str(i)] for i in spec.layer_ids]

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_TD, self.head_weight)

    def loss_sum(self, hidden_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Summed token cross-entropy, computed in slices so full logits never exist at once."""
        return chunked_cross_entropy(hidden_TD, self.head_weight, labels_T, self.loss_chunk)

    def token_losses(self, hidden_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token [T] (0 where not supervised), no autograd: what validation sums by position."""
        return token_cross_entropy(hidden_TD, self.head_weight, labels_T, self.loss_chunk)


class DecoderBlock:
    """Block ``index`` of a rank's ``Qwen2Decoder`` holding virtual stages, seen as a one-stage model: what a block's
    ``ChunkExecutor`` runs. Owns nothing: calls go to the rank's module (through its hooks, so a sharded root
    gathers its parameters as for a one-stage model), with ``block=index``."""

    def __init__(self, model: Qwen2Decoder, index: int) -> None:
        self.model, self.index = model, int(index)
        self.stage: StageSpec = model.stage.spec(self.index)
        self.cfg = model.cfg

    @property
    def layer_names(self) -> list[str]:
        return [str(i) for i in self.stage.layer_ids]

    def __call__(self, *args, **kwargs):
        return self.model(*args, block=self.index, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def loss_sum(self, hidden_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        return self.model.loss_sum(hidden_TD, labels_T)

    def token_losses(self, hidden_TD: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        return self.model.token_losses(hidden_TD, labels_T)


def name_seed(seed: int, name: str) -> int:
    # A stable (process-independent, unlike hash()) 63-bit seed per parameter name.
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1
