"""From the composed Hydra config (the application's) to the planner's typed inputs.

Entry points only (``python -m chunkflow_pl.plan``, ``chunk.size=auto`` in ``train.py``): the planner
itself (``core.py``) takes a ``ModelConfig``, a ``PlanSpec`` and lists of lengths. ``PlanSettings`` is the
typed ``plan`` group; the planner also checks the other groups it reads as ``train.py`` does, so a key that
stops a run (``+chunk.sise=8k``) stops the planner too. Which split backward / virtual stage settings are planned:
``plan_inputs`` (and ``runnable.py``, the runtime's refusals).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from chunkflow_pl.config import ChunkConfig, ParallelConfig
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.stats import global_batches, sequence_lengths
from chunkflow_pl.model.config import ModelConfig, ModelSettings
from chunkflow_pl.model.memory import available_memory
from chunkflow_pl.model.stages import split_stages
from chunkflow_pl.plan.core import PlanSpec
from chunkflow_pl.plan.layout import ClusterSpec
from chunkflow_pl.plan.runnable import SPLIT_CANDIDATES, VIRTUAL_CANDIDATES, refusal
from chunkflow_pl.schedule.cost import DEFAULT_INTER_NODE_GBPS, DEFAULT_INTRA_NODE_GBPS, Links
from chunkflow_pl.training.optim import OptimConfig
from chunkflow_pl.training.precision import check_precision
from chunkflow_pl.utils.host_memory import current_rss_bytes
from chunkflow_pl.utils.sizes import parse_bytes, parse_size
from chunkflow_pl.utils.typed_config import from_dict

log = logging.getLogger(__name__)
DEFAULT_FLOPS_PER_S = 400e12  # no device here to measure: ~40% of an H100's dense bf16 peak
CUDA_OVERHEAD = 2**30  # CUDA context + cuBLAS workspace + caching-allocator slack, roughly


@dataclass(frozen=True)
class PlanSettings:
    """The ``plan`` group (conf/plan/default.yaml), checked: unknown keys, wrong types, empty lists and
    non-positive values fail naming the key. Memory amounts accept ``75GiB``/``80GB``, sizes ``8k``.

    memory_budget: device bytes to plan for; None = what the training device has available now.
    overhead:      bytes the runtime holds besides the estimated tensors; None = measured (module docstring
                   of core.py). 0 is allowed.
    chunk_sizes:   candidate chunk sizes; None = powers of two from 512 up to the longest sequence.
    ks:            candidate k (an integer >= 1, or "chain": every chunk of the longest sequence kept).
    num_batches:   global batches simulated for the step time.
    flops_per_s:   FLOP/s of the cost model; None = measured on the training device (or 400e12 without one).
    devices:       cards to plan a layout for (``layout.py``); None = the launch's world size under ``parallel=auto``,
                   else no layout search (chunk.size and chunk.k only, for the configured layout).
    device_memory: bytes per card for the layout search; None = plan.memory_budget, else the device's.
    devices_per_node, intra_node_gbps, inter_node_gbps: how the cards are linked (gigabits per second per card,
                   inside a node and between nodes): the price of FSDP2's collectives and pipeline messages.
    """

    memory_budget: int | float | str | None = None
    overhead: int | float | str | None = None
    chunk_sizes: tuple[int | str, ...] | None = None
    ks: tuple[int | str, ...] = (1, 2, 4, 8, "chain")
    num_batches: int = 16
    flops_per_s: float | None = None
    devices: int | None = None
    device_memory: int | float | str | None = None
    devices_per_node: int = 8
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS

    def __post_init__(self) -> None:
        if self.device_memory is not None:
            object.__setattr__(self, "device_memory", parse_bytes(self.device_memory, key="plan.device_memory"))
        for key in ("devices", "devices_per_node"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"plan.{key}={v!r} must be a positive integer")
        for key in ("intra_node_gbps", "inter_node_gbps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"plan.{key}={v!r} must be a positive number of gigabits per second per card")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget, key="plan.memory_budget"))
        if self.overhead is not None:
            object.__setattr__(self, "overhead", parse_bytes(self.overhead, key="plan.overhead", allow_zero=True))
        if self.chunk_sizes is not None:
            if not self.chunk_sizes:
                raise ValueError("plan.chunk_sizes=[] lists no chunk size; give some (plan.chunk_sizes=[2k,4k,8k]) or "
                                 "null (powers of two up to the longest sequence)")
            object.__setattr__(self, "chunk_sizes", tuple(parse_size(c, key=f"plan.chunk_sizes[{i}]")
                                                          for i, c in enumerate(self.chunk_sizes)))
        if not self.ks:
            raise ValueError("plan.ks=[] lists no k; give some, e.g. plan.ks=[1,2,chain]")
        for i, k in enumerate(self.ks):
            if k != "chain" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise ValueError(f"plan.ks[{i}]={k!r} must be an integer >= 1 or chain")
        if self.num_batches < 1:
            raise ValueError(f"plan.num_batches={self.num_batches} must be >= 1 (global batches simulated)")
        if self.flops_per_s is not None and not (math.isfinite(self.flops_per_s) and self.flops_per_s > 0):
            raise ValueError(f"plan.flops_per_s={self.flops_per_s!r} must be a positive number of FLOP/s, or null "
                             f"(measured on the training device)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanSettings:
        return from_dict(cls, d, "plan")


def check_groups(cfg: DictConfig) -> tuple[PlanSettings, ParallelConfig, OptimConfig]:
    """The groups the planner reads, typed as train.py types them (``chunk.size=auto``/``chunk.k=auto`` are the
    planner's to fill, so they are left out of the chunk check)."""
    chunk = OmegaConf.to_container(cfg.chunk, resolve=True) if cfg.get("chunk") is not None else {}
    ChunkConfig.from_dict({k: v for k, v in chunk.items() if str(v).lower() != "auto"})
    check_precision(cfg.trainer.get("precision", "32-true"))
    return (PlanSettings.from_dict(cfg.get("plan") or {}), ParallelConfig.from_dict(cfg.parallel),
            OptimConfig.from_dict(cfg.optim))


@dataclass
class PlanInputs:
    model: ModelConfig
    spec: PlanSpec
    sample: list[list[int]]  # global batches to time
    epoch: list[list[int]]  # every global batch of epoch 0 (memory worst case)
    device: str
    cluster: ClusterSpec | None = None  # a layout search: plan.devices, or parallel=auto


def launch_world_size(env: Mapping[str, str]) -> int | None:
    """Processes the launcher started (torchrun's ``WORLD_SIZE``, srun's ``SLURM_NTASKS``); None outside one."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if str(env.get(key, "")).isdigit():
            return int(env[key])
    return None


def model_config(node: DictConfig) -> ModelConfig:
    """``cfg.model`` -> ``ModelConfig`` (preset + overrides, or a checkpoint's config.json), as train.py builds it."""
    return ModelSettings.from_dict(node).architecture()


def _device(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def plan_inputs(cfg: DictConfig, mcfg: ModelConfig | None = None, k: int | None = None,
                fixed_parallel: bool = False) -> PlanInputs:
    """Everything ``core.plan_chunking`` needs from ``cfg``; ``k`` restricts the candidates to one k.

    Split backward and virtual stages: with ``fixed_parallel`` (``chunk.size=auto``) the config's own setting
    only, refused as the run would refuse it; else a layout search tries both (``plan_layout`` leaves out, per
    layout, what the runtime refuses) and the chunk table for the configured layout every runnable one."""
    settings, parallel, optim = check_groups(cfg)
    mcfg = mcfg or model_config(cfg.model)
    lora = int(cfg.model.get("lora", {}).get("rank", 0)) > 0
    layout = dict(pp=parallel.pp, data_parallel=parallel.data_parallel, num_layers=mcfg.num_layers,
                  layer_checkpoint=str(cfg.chunk.get("layer_checkpoint", "none")),
                  precision=str(cfg.trainer.precision), lora=lora)
    if fixed_parallel:
        why = refusal(parallel.split_backward, parallel.virtual_stages, auto=parallel.auto, **layout)
        if why:
            raise ValueError(why)
        splits, virtuals = (parallel.split_backward,), (parallel.virtual_stages,)
    elif parallel.auto or settings.devices is not None:  # ParallelConfig refused virtual_stages > 1 with auto
        splits, virtuals = SPLIT_CANDIDATES, VIRTUAL_CANDIDATES
    else:
        splits = tuple(s for s in SPLIT_CANDIDATES if refusal(s, 1, **layout) is None)
        virtuals = tuple(v for v in VIRTUAL_CANDIDATES if refusal(False, v, **layout) is None)
    split_stages(mcfg.num_layers, parallel.pp)  # parallel.pp larger than the model's layers: say so now
    device = _device(str(cfg.trainer.get("accelerator", "auto")))
    here = device == "cpu" or torch.cuda.is_available()
    if settings.memory_budget is not None:
        budget = int(settings.memory_budget)
    elif settings.device_memory is not None:
        budget = int(settings.device_memory)
    elif here:
        budget = available_memory(device)
    else:
        raise ValueError("trainer.accelerator asks for CUDA but none is here: give plan.memory_budget (e.g. 75GiB)")
    if settings.overhead is not None:
        overhead = int(settings.overhead)
    else:
        overhead = CUDA_OVERHEAD if device == "cuda" else current_rss_bytes()
    if settings.flops_per_s is not None:
        flops = settings.flops_per_s
    elif here:
        from chunkflow_pl.utils.peak_flops import matmul_dtype, measure_peak_flops

        dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        flops = measure_peak_flops(dev, matmul_dtype(str(cfg.trainer.precision)))
    else:
        flops = DEFAULT_FLOPS_PER_S
    cluster = None
    devices = settings.devices if settings.devices is not None else (
        launch_world_size(os.environ) if parallel.auto else None)
    if parallel.auto and devices is None:
        raise ValueError("parallel=auto needs the number of cards: launch with torchrun/srun, or set plan.devices")
    if devices is not None:
        memory = settings.device_memory if settings.device_memory is not None else budget
        cluster = ClusterSpec(devices, int(memory), Links(settings.devices_per_node, settings.intra_node_gbps,
                                                          settings.inter_node_gbps))
        if str(cfg.chunk.size).lower() != "auto" and settings.chunk_sizes is None:
            chunk_sizes = (int(ChunkConfig(size=cfg.chunk.size).size),)  # fixed: searched only when auto
        else:
            chunk_sizes = settings.chunk_sizes
        if k is None and str(cfg.chunk.k).lower() != "auto":
            k = int(cfg.chunk.k)
    else:
        chunk_sizes = settings.chunk_sizes
    spec = PlanSpec(
        memory_budget=budget,
        precision=str(cfg.trainer.precision),
        optimizer=optim.name,
        loss_chunk=int(cfg.model.loss_chunk),
        pp=parallel.pp,
        dp=parallel.dp,
        chunk_sizes=chunk_sizes,  # type: ignore[arg-type]  # parsed to ints in __post_init__
        ks=(k,) if k is not None else settings.ks,
        flops_per_s=flops,
        overhead=overhead,
        split_backward=splits,
        virtual=virtuals,
        lora=lora,
    )
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    lengths = sequence_lengths(data, mcfg.vocab_size)
    epoch = global_batches(lengths, data, None)
    return PlanInputs(model=mcfg, spec=spec, sample=epoch[:settings.num_batches], epoch=epoch, device=device,
                      cluster=cluster)
