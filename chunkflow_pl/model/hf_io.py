"""Hugging Face checkpoint I/O: read and write ``config.json`` + ``*.safetensors`` directories.

Weight names map declaratively (``NAME_MAP``: ours <-> transformers' ``Qwen2ForCausalLM``); ``{i}`` is
the layer index. Sharded checkpoints (``model.safetensors.index.json``) are read shard by shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chunkflow_pl.model.config import ModelConfig

NAME_MAP: tuple[tuple[str, str], ...] = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "generation_config.json", "chat_template.jinja",
)


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_OURS_TO_HF = [(_compile(o), h) for o, h in NAME_MAP]
_HF_TO_OURS = [(_compile(h), o) for o, h in NAME_MAP]


def _rename(name: str, table) -> str | None:
    for rx, target in table:
        m = rx.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def to_hf_name(name: str) -> str:
    """transformers' name of our parameter ``name`` (a LoRA-wrapped projection's frozen ``base_layer`` weight
    included: it is the plain weight)."""
    out = _rename(name.replace(".base_layer.", "."), _OURS_TO_HF)
    if out is None:
        raise KeyError(f"parameter {name!r} has no Hugging Face name in NAME_MAP")
    return out


def to_hf_module(module: str) -> str:
    """transformers' name of our projection module (``layers.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj``)."""
    return to_hf_name(module + ".weight").removesuffix(".weight")


def from_hf_name(name: str) -> str | None:
    """Our name for a Hugging Face tensor name; None for tensors we do not use (e.g. rotary buffers)."""
    return _rename(name, _HF_TO_OURS)


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: model.pretrained must hold safetensors weights")
    return files


def load_hf_state_dict(path: str | Path, cfg: ModelConfig, wanted: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Our-named state dict from a Hugging Face directory (tied checkpoints drop ``lm_head``).

    ``wanted``: our names to read (a pipeline stage's own parameters); None reads everything. Files are
    opened lazily (``safe_open``), so a stage reads only its own tensors.
    """
    path = Path(path)
    out: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(path):
        with safe_open(str(f), framework="pt") as st:
            for hf_name in st.keys():
                ours = from_hf_name(hf_name)
                if ours is None:
                    continue
                if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if wanted is not None and ours not in wanted:
                    continue
                out[ours] = st.get_tensor(hf_name)
    return out


def load_pretrained(model: torch.nn.Module, path: str | Path, cfg: ModelConfig) -> None:
    """Copy a Hugging Face checkpoint's weights into ``model`` (whole, or one pipeline stage of it)."""
    own = model.state_dict()
    sd = load_hf_state_dict(path, cfg, wanted=set(own))
    missing = sorted(set(own) - set(sd))
    if missing:
        raise ValueError(f"checkpoint {path} does not match the architecture of its config.json: "
                         f"missing {[to_hf_name(k) for k in missing[:5]]}")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: tensor {to_hf_name(k)} has shape {tuple(t.shape)}, "
                             f"expected {tuple(own[k].shape)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k].to(p.dtype))


def save_hf(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``Qwen2ForCausalLM.from_pretrained`` loads
    (``state``: the tensors to write, when not ``model.state_dict()``, e.g. gathered from shards)."""
    out = Path(out_dir)
    weight_map = save_hf_shard(model, out, "model.safetensors", dtype=dtype, state=state)
    write_hf_config(out, cfg, weight_map, dtype_name=_dtype_name(model, dtype), tokenizer_dir=tokenizer_dir,
                    index=False)
    return out


def save_hf_shard(model: torch.nn.Module, out_dir: str | Path, filename: str, dtype: torch.dtype | None = None,
                  skip: set[str] | None = None, state: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Write ``model``'s tensors (or ``state``'s; our names ``skip`` excluded) as one safetensors file under their
    Hugging Face names; return ``{hf_name: filename}`` for the index. A pipeline stage writes one shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in (state if state is not None else model.state_dict()).items():
        if skip and name in skip:
            continue
        t = t.detach().to("cpu")
        tensors[to_hf_name(name)] = (t.to(dtype) if dtype is not None else t).contiguous()
    tmp = out / (filename + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a killed export keeps its mode through touch()
    tmp.touch()  # created as every other file here is (0666 less the umask): safetensors itself makes it 0600
    mode = tmp.stat().st_mode & 0o777
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(mode)
    tmp.replace(out / filename)
    return dict.fromkeys(tensors, filename)


def _dtype_name(model: torch.nn.Module, dtype: torch.dtype | None) -> str:
    d = dtype if dtype is not None else next(model.parameters()).dtype
    return str(d).removeprefix("torch.")


def write_hf_config(out_dir: str | Path, cfg: ModelConfig, weight_map: dict[str, str], dtype_name: str,
                    tokenizer_dir: str | Path | None = None, index: bool = True) -> None:
    """``config.json`` (+ ``model.safetensors.index.json`` for shards written by several ranks) + tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = dtype_name
    hf_cfg["dtype"] = dtype_name
    if index:
        body = {"metadata": {"format": "pt"}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(body, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy2(src, out / name)
