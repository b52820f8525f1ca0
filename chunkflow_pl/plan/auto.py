"""``chunk.size=auto``: replace it (and ``chunk.k=auto``) by the planner's recommendation before training."""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig, open_dict

from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.plan.core import format_table, plan_chunking
from chunkflow_pl.plan.settings import PlanSettings, plan_inputs
from chunkflow_pl.utils.sizes import format_bytes

log = logging.getLogger("chunkflow_pl")


def resolve_auto_chunk(cfg: DictConfig, mcfg: ModelConfig) -> DictConfig:
    """``cfg`` unchanged unless ``chunk.size=auto``; then a copy with the recommended ``chunk.size`` and,
    if ``chunk.k=auto`` too, ``chunk.k`` (otherwise the best chunk size for the given ``chunk.k``)."""
    plan = PlanSettings.from_dict(cfg.get("plan") or {})  # typed even when unused: +plan.foo=1 stops a run
    if str(cfg.chunk.size).lower() != "auto":
        if str(cfg.chunk.k).lower() == "auto":
            raise ValueError("chunk.k=auto needs chunk.size=auto (the planner picks them together)")
        return cfg
    k = None if str(cfg.chunk.k).lower() == "auto" else int(cfg.chunk.k)
    if int(cfg.parallel.dp) * int(cfg.parallel.pp) > 1 and (plan.memory_budget is None or plan.flops_per_s is None):
        # measured defaults differ from process to process; every rank must pick the same setting
        raise ValueError("chunk.size=auto with parallel.dp x parallel.pp > 1 needs plan.memory_budget and "
                         "plan.flops_per_s set explicitly, so that every rank derives the same setting")
    inputs = plan_inputs(cfg, mcfg, k=k)
    result = plan_chunking(inputs.model, inputs.spec, inputs.sample, inputs.epoch)
    log.info("chunk.size=auto: planner predictions (python -m chunkflow_pl.plan prints the same table)\n%s",
             format_table(result))
    if result.best is None:
        raise ValueError(f"chunk.size=auto: no candidate fits the memory budget of "
                         f"{format_bytes(inputs.spec.memory_budget)} (plan.memory_budget); see the table above, "
                         f"or run python -m chunkflow_pl.plan with the same overrides")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.chunk.size = result.best.chunk_size
        out.chunk.k = result.best.k
    log.info("chunk.size=auto -> %s", result.override())
    return out
