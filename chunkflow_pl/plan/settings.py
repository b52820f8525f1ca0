"""From the composed Hydra config (the application's) to the planner's typed inputs.

Entry points only (``python -m chunkflow_pl.plan``, ``chunk.size=auto`` in ``train.py``): the planner
itself (``core.py``) takes a ``ModelConfig``, a ``PlanSpec`` and lists of lengths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.stats import global_batches, sequence_lengths
from chunkflow_pl.model.config import ModelConfig, ModelSettings
from chunkflow_pl.model.memory import available_memory
from chunkflow_pl.plan.core import PlanSpec
from chunkflow_pl.utils.host_memory import current_rss_bytes
from chunkflow_pl.utils.sizes import parse_bytes, parse_size

log = logging.getLogger(__name__)
DEFAULT_FLOPS_PER_S = 400e12  # no device here to measure: ~40% of an H100's dense bf16 peak
CUDA_OVERHEAD = 2**30  # CUDA context + cuBLAS workspace + caching-allocator slack, roughly


@dataclass
class PlanInputs:
    model: ModelConfig
    spec: PlanSpec
    sample: list[list[int]]  # global batches to time
    epoch: list[list[int]]  # every global batch of epoch 0 (memory worst case)
    device: str


def model_config(node: DictConfig) -> ModelConfig:
    """``cfg.model`` -> ``ModelConfig`` (preset + overrides, or a checkpoint's config.json), as train.py builds it."""
    return ModelSettings.from_dict(node).architecture()


def _device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def plan_inputs(cfg: DictConfig, mcfg: ModelConfig | None = None, k: int | None = None) -> PlanInputs:
    """Everything ``core.plan_chunking`` needs from ``cfg``; ``k`` restricts the candidates to one k."""
    mcfg = mcfg or model_config(cfg.model)
    p = cfg.get("plan") or OmegaConf.create({})
    device = _device(str(cfg.trainer.get("accelerator", "auto")))
    here = device == "cpu" or torch.cuda.is_available()
    if p.get("memory_budget") is not None:
        budget = parse_bytes(p.memory_budget, key="plan.memory_budget")
    elif here:
        budget = available_memory(device)
    else:
        raise ValueError("trainer.accelerator asks for CUDA but none is here: give plan.memory_budget (e.g. 75GiB)")
    if p.get("overhead") is not None:
        overhead = parse_bytes(p.overhead, key="plan.overhead", allow_zero=True)
    else:
        overhead = CUDA_OVERHEAD if device == "cuda" else current_rss_bytes()
    if p.get("flops_per_s") is not None:
        flops = float(p.flops_per_s)
    elif here:
        from chunkflow_pl.utils.peak_flops import matmul_dtype, measure_peak_flops

        dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        flops = measure_peak_flops(dev, matmul_dtype(str(cfg.trainer.precision)))
    else:
        flops = DEFAULT_FLOPS_PER_S
    sizes = p.get("chunk_sizes")
    ks = (k,) if k is not None else tuple(x if x == "chain" else int(x) for x in (p.get("ks") or (1,)))
    spec = PlanSpec(
        memory_budget=budget,
        precision=str(cfg.trainer.precision),
        optimizer=str(cfg.optim.name),
        loss_chunk=int(cfg.model.loss_chunk),
        pp=int(cfg.parallel.pp),
        dp=int(cfg.parallel.dp),
        chunk_sizes=tuple(parse_size(s, key="plan.chunk_sizes") for s in sizes) if sizes else None,
        ks=ks,
        flops_per_s=flops,
        overhead=overhead,
    )
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    lengths = sequence_lengths(data, mcfg.vocab_size)
    epoch = global_batches(lengths, data, None)
    n = int(p.get("num_batches") or 16)
    return PlanInputs(model=mcfg, spec=spec, sample=epoch[:n], epoch=epoch, device=device)
