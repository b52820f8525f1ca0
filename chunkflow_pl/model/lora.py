"""LoRA adapters on the decoder's projections, injected with peft after the weights are loaded.

``model.lora.rank=16`` replaces each targeted ``nn.Linear`` (``q_proj`` ... ``down_proj``) by peft's LoRA
layer, which keeps the frozen weight as ``base_layer`` and adds ``scale * B(A(x))`` (``scale = alpha / rank``)::

    layers.3.attn.q_proj.weight  ->  layers.3.attn.q_proj.base_layer.weight          frozen
                                     layers.3.attn.q_proj.lora_A.default.weight      [rank, in]   trained
                                     layers.3.attn.q_proj.lora_B.default.weight      [out, rank]  trained (starts at 0)

Only adapter parameters require grad, so only they get gradients, optimizer state and (under FSDP2)
gradient reduction; the chunked step is unchanged (the adapters are ordinary parameters of the
projections). Dropout is refused: a recomputed chunk (``chunk.k``) or layer (``chunk.layer_checkpoint``)
runs its forward again and would draw another mask, so the gradient would not be the forward's.

Exports (``export_tensors``): the adapters in PEFT's format (``base_model.model.<HF module>.lora_A.weight``,
what ``peft.PeftModel.from_pretrained`` loads onto transformers' model), or the merged full weights
``W + scale * B @ A`` under the plain names (``export.merge_lora=true``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from chunkflow_pl.model.config import ADAPTER, LoraSettings


def apply_lora(model: nn.Module, settings: LoraSettings, generator: torch.Generator | None = None) -> None:
    """Inject adapters into ``model`` in place (after its weights are loaded, before sharding) and freeze the rest.
    Targets that match no linear module are refused, listing the ones that exist. The adapters' init draws one
    number from ``generator`` (default: the global one), then one generator per parameter name."""
    if not settings.enabled:
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                    - {"lm_head"})
    unknown = [t for t in settings.target if t not in linear]
    if unknown:
        raise ValueError(f"model.lora.target {unknown} match no module of the decoder; its linear modules are "
                         f"{linear}")
    from peft import inject_adapter_in_model

    inject_adapter_in_model(settings.peft_config(), model, adapter_name=ADAPTER)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
        if is_adapter(name):
            _init_adapter(p, name, seed)
    model.lora = settings  # exports and the memory estimate read it


def _init_adapter(p: torch.nn.Parameter, name: str, seed: int) -> None:
    """peft's default init (A: uniform(+-1/sqrt(in)) as kaiming_uniform(a=sqrt(5)); B: 0), drawn from a generator
    seeded by (seed, name): a pipeline stage gets the adapters the whole model would, whatever the split."""
    from chunkflow_pl.model.decoder import name_seed

    with torch.no_grad():
        if ".lora_B." in name:
            p.zero_()
            return
        g = torch.Generator(device=p.device).manual_seed(name_seed(seed, name))
        bound = p.shape[1] ** -0.5
        p.uniform_(-bound, bound, generator=g)


def lora_of(model: nn.Module) -> LoraSettings | None:
    s = getattr(model, "lora", None)
    return s if isinstance(s, LoraSettings) and s.enabled else None


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The name a parameter has without adapters (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_tensors(state: dict[str, torch.Tensor], settings: LoraSettings, merge: bool) -> dict[str, torch.Tensor]:
    """From a state dict with adapters (whole tensors, our names): the merged full weights under plain names
    (``merge``), or the adapters alone, keyed by our module names (``layers.0.attn.q_proj.lora_A``)."""
    if not merge:
        return {name.replace(f".{ADAPTER}.weight", ""): t for name, t in state.items() if is_adapter(name)}
    out = {}
    for name, t in state.items():
        if is_adapter(name):
            continue
        module = name[: -len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        if module is not None:
            a, b = state[f"{module}.lora_A.{ADAPTER}.weight"], state[f"{module}.lora_B.{ADAPTER}.weight"]
            acc = torch.promote_types(t.dtype, torch.float32)  # merge in >= fp32, round once
            t = (t.to(acc) + settings.scale * (b.to(acc) @ a.to(acc))).to(t.dtype)
        out[base_name(name)] = t
    return out


def save_adapter(adapters: dict[str, torch.Tensor], settings: LoraSettings, out_dir: str | Path,
                 base_model: str | None, to_hf_module) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's layout; ``to_hf_module`` maps our module
    name (``layers.0.attn.q_proj``) to transformers' (``model.layers.0.self_attn.q_proj``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for key, t in adapters.items():
        module, which = key.rsplit(".", 1)  # ...q_proj, lora_A
        tensors[f"base_model.model.{to_hf_module(module)}.{which}.weight"] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    settings.peft_config(base_model).save_pretrained(str(out))
    return out
