"""One config dataclass for the decoder (Qwen2 / Qwen2.5 and Llama 3.x), with named presets.

Each preset copies the architecture fields of the Hugging Face ``config.json`` it cites; ``tiny`` is
ours (random weights, fast on a laptop CPU). The two families differ only where the fields say so:

    architecture  qkv_bias  rope_type        HF class
    qwen2         True      default          Qwen2ForCausalLM
    llama         False     default|llama3   LlamaForCausalLM (llama3: frequency-band RoPE scaling)

A ``config.json`` asking for anything else (q/k norms, experts, sliding windows, another RoPE scaling,
biases elsewhere) is refused at start, naming what the decoder lacks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chunkflow_pl.utils.typed_config import SIZE, check_fields, from_dict


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = field(default=32768, metadata=SIZE)
    name: str = "custom"
    architecture: str = "qwen2"  # qwen2 | llama: the Hugging Face class an export names
    qkv_bias: bool = True  # Qwen2: biases on q/k/v projections; Llama: none
    # RoPE frequency scaling: default (none) or llama3 (Llama 3.1+: long wavelengths divided by rope_factor,
    # short ones kept, the band between interpolated; rope_original_max_positions is the pre-training context)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} must be one of {', '.join(ARCHITECTURES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} must be one of {', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3" and not (self.rope_factor > 0 and
                                               self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            raise ValueError("llama3 RoPE scaling needs rope_factor > 0 and rope_high_freq_factor > "
                             "rope_low_freq_factor > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads} "
                "(set them with model.overrides.hidden_size / model.overrides.num_heads)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(set them with model.overrides.num_heads / model.overrides.num_kv_heads)"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim = hidden_size / num_heads must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (norms, attention with its q/k/v biases if any, MLP)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        bias = self.num_heads * hd + 2 * self.num_kv_heads * hd if self.qkv_bias else 0
        attn = d * d + 2 * d * self.num_kv_heads * hd + d * d + bias
        return attn + 3 * d * f + 2 * d

    def num_params(self) -> int:
        """Exact parameter count of the decoder this config builds."""
        d = self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * self.layer_params + d + head

    # ---- Hugging Face config.json ------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        common = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
        }
        if self.architecture == "llama":
            out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "attention_bias": False,
                   "mlp_bias": False, "head_dim": self.head_dim}
            if self.rope_type == "llama3":
                out["rope_scaling"] = {"rope_type": "llama3", "factor": self.rope_factor,
                                       "low_freq_factor": self.rope_low_freq_factor,
                                       "high_freq_factor": self.rope_high_freq_factor,
                                       "original_max_position_embeddings": self.rope_original_max_positions}
            return out
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common, "use_sliding_window": False}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "pretrained") -> ModelConfig:
        arch = _check_supported(d)
        rope = _rope_parameters(d)
        kind = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling = {}
        if kind == "llama3":
            scaling = dict(rope_type="llama3", rope_factor=float(rope["factor"]),
                           rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                           rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                           rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)))
        elif kind != "default":
            raise ValueError(f"{name}: config.json asks for rope_scaling of type {kind!r}; the decoder implements "
                             f"RoPE without scaling and Llama 3's 'llama3' scaling only")
        cfg = cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            name=name,
            architecture=arch,
            qkv_bias=arch == "qwen2",
            **scaling,
        )
        if d.get("head_dim") not in (None, cfg.head_dim):
            raise ValueError(f"{name}: config.json has head_dim={d['head_dim']}, but the decoder uses hidden_size / "
                             f"num_attention_heads = {cfg.head_dim}")
        return cfg

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{cfg_file} not found: model.pretrained must be a Hugging Face checkpoint directory "
                "holding config.json and *.safetensors"
            )
        return cls.from_hf_dict(json.loads(cfg_file.read_text()), name=str(path))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ARCHITECTURES = ("qwen2", "llama")
ROPE_TYPES = ("default", "llama3")
_MISSING = {  # model_type -> what the decoder would need for it
    "qwen3": "per-head q/k RMSNorm (q_norm, k_norm)",
    "qwen2_moe": "mixture-of-experts MLP layers",
    "qwen3_moe": "mixture-of-experts MLP layers and q/k RMSNorm",
    "mixtral": "mixture-of-experts MLP layers",
    "mistral": "sliding-window attention",
    "gemma": "GeGLU MLP, embedding scaling and (1 + weight) RMSNorm",
    "gemma2": "soft-capping, sliding windows and extra norms",
}


def _check_supported(d: Mapping[str, Any]) -> str:
    """The architecture of a Hugging Face ``config.json`` (qwen2 or llama), or a ValueError naming what is missing."""
    kind = d.get("model_type") or "qwen2"
    if kind in _MISSING:
        raise ValueError(f"model_type={kind!r} is not supported: the decoder has no {_MISSING[kind]} "
                         f"(supported: qwen2 = Qwen2/2.5, llama = Llama 3.x)")
    if kind not in ARCHITECTURES:
        raise ValueError(f"model_type={kind!r} is not supported (supported: qwen2 = Qwen2/2.5, llama = Llama 3.x)")
    problems = []
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d['hidden_act']!r} (only silu)")
    if kind == "qwen2" and d.get("use_sliding_window"):
        problems.append("use_sliding_window=true (sliding-window attention)")
    if kind == "llama":
        if d.get("attention_bias"):
            problems.append("attention_bias=true (biases on q/k/v/o projections)")
        if d.get("mlp_bias"):
            problems.append("mlp_bias=true (biases in the MLP)")
    if d.get("num_experts") or d.get("num_local_experts"):
        problems.append("experts (mixture-of-experts layers)")
    if problems:
        raise ValueError(f"model_type={kind!r} with " + "; ".join(problems) + ": not implemented by the decoder")
    return kind


def _rope_parameters(d: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either layout: transformers 4 (``rope_theta`` + ``rope_scaling``) or 5
    (``rope_parameters`` holding both)."""
    out = dict(d.get("rope_scaling") or {})
    out.update(d.get("rope_parameters") or {})
    if d.get("rope_theta") is not None:
        out.setdefault("rope_theta", d["rope_theta"])
    return out


# Qwen2.5 architectures, each from the config.json of the cited Hugging Face repository.
_Q = dict(rope_theta=1_000_000.0)
_L = dict(rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
          architecture="llama", qkv_bias=False, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
          rope_high_freq_factor=4.0, rope_original_max_positions=8192)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(name="tiny"),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
    "qwen0.5b": ModelConfig(151936, 896, 4864, 24, 14, 2, **_Q, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            max_position_embeddings=32768, name="qwen0.5b"),
    # https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json
    "qwen1.5b": ModelConfig(151936, 1536, 8960, 28, 12, 2, **_Q, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            max_position_embeddings=131072, name="qwen1.5b"),
    # https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json
    "qwen3b": ModelConfig(151936, 2048, 11008, 36, 16, 2, **_Q, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          max_position_embeddings=32768, name="qwen3b"),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    "qwen7b": ModelConfig(152064, 3584, 18944, 28, 28, 4, **_Q, rms_norm_eps=1e-6, tie_word_embeddings=False,
                          max_position_embeddings=131072, name="qwen7b"),
    # https://huggingface.co/Qwen/Qwen2.5-14B/blob/main/config.json
    "qwen14b": ModelConfig(152064, 5120, 13824, 48, 40, 8, **_Q, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           max_position_embeddings=131072, name="qwen14b"),
    # https://huggingface.co/Qwen/Qwen2.5-32B/blob/main/config.json
    "qwen32b": ModelConfig(152064, 5120, 27648, 64, 40, 8, **_Q, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           max_position_embeddings=131072, name="qwen32b"),
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    "qwen72b": ModelConfig(152064, 8192, 29568, 80, 64, 8, **_Q, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           max_position_embeddings=131072, name="qwen72b"),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama3.1-8b": ModelConfig(128256, 4096, 14336, 32, 32, 8, **_L, name="llama3.1-8b"),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama3.1-70b": ModelConfig(128256, 8192, 28672, 80, 64, 8, **_L, name="llama3.1-70b"),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (checked like ``model.overrides``)."""
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], **check_fields(ModelConfig, overrides, "model.overrides"))


# LoRA settings live here (pure, no torch: planning imports this module without torch); model/lora.py applies them.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name; PEFT's files drop it


@dataclass(frozen=True)
class LoraSettings:
    """The ``model.lora`` group. rank 0 = no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    target: tuple[str, ...] = TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank} must be >= 0 (0 = no adapters)")
        if self.rank and not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0")
        if self.dropout != 0:
            raise ValueError(f"model.lora.dropout={self.dropout} is not supported: a recomputed chunk or layer runs "
                             f"its forward again and would draw another dropout mask; use model.lora.dropout=0")
        if self.rank and not self.target:
            raise ValueError("model.lora.target is empty: name the projections to adapt, e.g. [q_proj,v_proj]")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapter_params(self, cfg: ModelConfig, num_layers: int) -> int:
        """Parameters of the adapters on ``num_layers`` decoder layers: ``rank x (in + out)`` per adapted projection."""
        if not self.enabled:
            return 0
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        dims = {"q_proj": d + q, "k_proj": d + kv, "v_proj": d + kv, "o_proj": q + d, "gate_proj": d + f,
                "up_proj": d + f, "down_proj": f + d}
        return num_layers * self.rank * sum(dims.get(t, 0) for t in self.target)

    def peft_config(self, base_model: str | None = None):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target), lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


@dataclass(frozen=True)
class ModelSettings:
    """The Hydra ``model`` group: which architecture (a preset with field overrides, or the
    ``config.json`` of a Hugging Face checkpoint directory) and how to run it.

    preset:     a key of ``PRESETS``; overrides: ``ModelConfig`` fields to replace (null = keep).
    pretrained: Hugging Face checkpoint directory; its config.json defines the architecture.
    attention:  auto (flash-attn on CUDA when installed, else sdpa), sdpa or flash.
    loss_chunk: tokens per slice of the LM head + cross-entropy (full logits never exist at once).
    init_std:   std of the random initialisation (ignored with pretrained).
    lora:       LoRA adapters (``model/lora.py``): rank (0 = off), alpha, target, dropout (only 0).
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    attention: str = "auto"
    loss_chunk: int = field(default=4096, metadata=SIZE)
    init_std: float = 0.02
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if not self.init_std > 0:
            raise ValueError(f"model.init_std={self.init_std} must be positive")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSettings:
        return from_dict(cls, d, "model")

    def architecture(self) -> ModelConfig:
        overrides = {k: v for k, v in self.overrides.items() if v is not None}
        if self.pretrained:
            if overrides:
                raise ValueError(f"model.overrides {sorted(overrides)} cannot change the architecture of "
                                 f"model.pretrained={self.pretrained} (its config.json defines it); drop them")
            return ModelConfig.from_hf_dir(self.pretrained)
        return get_preset(self.preset, **overrides)
