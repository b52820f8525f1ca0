"""Hugging Face export from every rank of a run: one checkpoint directory that transformers loads.

One stage: global rank 0 writes ``model.safetensors``. A pipeline: data-parallel rank 0 of each stage
writes its shard ``model-0000s-of-0000p.safetensors`` (a tied head is written once, by the first
stage) and global rank 0 writes the index that joins them. Sharded parameters (FSDP2 DTensors) are
gathered first, tensor by tensor onto the host, over the stage's data-parallel ranks. Collective: every
rank calls it with the same ``out``; the caller's barrier follows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from chunkflow_pl.model.hf_io import save_hf, save_hf_shard, to_hf_module, write_hf_config
from chunkflow_pl.model.lora import export_tensors, lora_of, save_adapter
from chunkflow_pl.model.stages import StageSpec
from chunkflow_pl.strategy.dims import ParallelDims


def export_hf(model: torch.nn.Module, out: Path, dims: ParallelDims, rank: int, spec: StageSpec | None,
              dtype: torch.dtype | None = None, tokenizer_dir=None, merge_lora: bool = False,
              base_model: str | None = None) -> Path:
    """Write this rank's part of the export of ``model`` to ``out`` (``spec``: this rank's stage, pp > 1). With LoRA
    adapters: a PEFT adapter folder (``base_model``: the checkpoint they adapt), or with ``merge_lora`` the merged
    full weights."""
    cfg = model.cfg
    pp_rank, dp_rank = dims.coords(rank)
    state = gathered_state(model, keep=dp_rank == 0)
    lora = lora_of(model)
    if lora is not None:
        whole = state if state is not None else model.state_dict()
        state = export_tensors(whole, lora, merge=merge_lora) if dp_rank == 0 else {}
        if not merge_lora:  # one adapter file, written by rank 0 from every stage's adapters
            parts: list[Any] = [state]
            if dims.world_size > 1:
                parts = [None] * dims.world_size
                dist.all_gather_object(parts, {k: v.cpu() for k, v in state.items()})
            if rank == 0:
                save_adapter({k: v for p in parts for k, v in (p or {}).items()}, lora, out, base_model, to_hf_module)
            return out
    if dims.pp == 1:
        if rank == 0:
            save_hf(model, cfg, out, dtype=dtype, tokenizer_dir=tokenizer_dir, state=state)
        return out
    assert spec is not None, "a pipeline export needs the stage split"
    weight_map: dict[str, str] = {}
    if dp_rank == 0:
        skip = {"embed.weight"} if not spec.takes_ids else None
        name = f"model-{pp_rank + 1:05d}-of-{dims.pp:05d}.safetensors"
        weight_map = save_hf_shard(model, out, name, dtype=dtype, skip=skip, state=state)
    maps: list[Any] = [None] * dims.world_size
    dist.all_gather_object(maps, weight_map)
    if rank == 0:
        merged = {k: v for m in maps for k, v in (m or {}).items()}
        dtype_name = str(dtype if dtype is not None else next(model.parameters()).dtype).removeprefix("torch.")
        write_hf_config(out, cfg, merged, dtype_name, tokenizer_dir=tokenizer_dir, index=True)
    return out


def gathered_state(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The model's tensors, whole, on the host (``keep``: this rank writes them; others only take part in the
    gathers, in the same order). ``None`` when nothing is sharded: the caller reads ``model.state_dict()``."""
    sd = model.state_dict()
    if not any(hasattr(t, "full_tensor") for t in sd.values()):
        return None
    out = {}
    for name, t in sd.items():
        whole = t.full_tensor() if hasattr(t, "full_tensor") else t
        if keep:
            out[name] = whole.detach().to("cpu")
    return out
