"""Optimizer and learning-rate schedule from a typed config."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from chunkflow_pl.training.nonfinite import ON_NONFINITE
from chunkflow_pl.utils.typed_config import from_dict

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    on_nonfinite: str = "error"  # error | skip: a step whose loss or gradient norm is NaN/inf (training/nonfinite.py)
    max_consecutive_skips: int = 10  # with skip: this many skipped steps in a row stop the run

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is unknown; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is unknown; choose one of {SCHEDULES}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"optim.on_nonfinite={self.on_nonfinite!r} is unknown; choose one of {ON_NONFINITE}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"optim.max_consecutive_skips={self.max_consecutive_skips} must be >= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimConfig:
        return from_dict(cls, d, "optim")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases and norm gains are not decayed (the usual LLM recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("norm.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the base lr at step s: linear warmup, then cosine to ``min_lr_ratio`` or constant."""

    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant" or total_steps <= cfg.warmup_steps:
            return 1.0
        t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f
