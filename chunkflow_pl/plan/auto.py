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
    if ``chunk.k=auto`` too, ``chunk.k`` (otherwise the best chunk size for the given ``chunk.k``). Planned for
    the configured ``parallel.split_backward`` / ``parallel.virtual_stages``, which it leaves as they are."""
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
    inputs = plan_inputs(cfg, mcfg, k=k, fixed_parallel=True)  # chunk.* only: parallel.* is the user's
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


def resolve_auto_layout(cfg: DictConfig, mcfg: ModelConfig) -> DictConfig:
    """``cfg`` unchanged unless ``parallel=auto`` (``parallel.auto: true``); then a copy with the layout planner's pick
    (``layout.py``) for the launch's world size (or ``plan.devices``): ``parallel.pp``, ``dp_replicate``,
    ``dp_shard``, ``grad_reduce``, ``split_backward``, ``virtual_stages``, ``chunk.layer_checkpoint``, and
    ``chunk.size`` / ``chunk.k`` (searched only when ``auto``). Split backward and virtual stages are picked only
    where the runtime runs them (``runnable.py``)."""
    from chunkflow_pl.plan.layout import plan_layout
    from chunkflow_pl.plan.layout_report import format_layouts

    if not bool(cfg.parallel.get("auto", False)):
        return cfg
    plan = PlanSettings.from_dict(cfg.get("plan") or {})
    if plan.flops_per_s is None:
        # a measured rate differs from process to process; every rank must pick the same layout
        raise ValueError("parallel=auto needs plan.flops_per_s set explicitly (e.g. plan.flops_per_s=4e14), so that "
                         "every rank derives the same layout")
    inputs = plan_inputs(cfg, mcfg)
    result = plan_layout(inputs.model, inputs.spec, inputs.cluster, inputs.sample, inputs.epoch)
    log.info("parallel=auto: layout planner (python -m chunkflow_pl.plan prints the same)\n%s", format_layouts(result))
    if result.best is None:
        raise ValueError(f"parallel=auto: no layout of {inputs.cluster.devices} cards fits "
                         f"{format_bytes(inputs.cluster.device_memory)} per card (plan.device_memory); see the table "
                         f"above, or run python -m chunkflow_pl.plan with the same overrides")
    lay = result.best.layout
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.parallel.update(auto=False, dp=1, pp=lay.pp, dp_replicate=lay.dp_replicate, dp_shard=lay.dp_shard,
                            grad_reduce=lay.grad_reduce, reshard_after_forward=False,
                            split_backward=lay.split_backward, virtual_stages=lay.virtual)
        out.chunk.update(size=lay.chunk_size, k=lay.k, layer_checkpoint=lay.layer_checkpoint)
    log.info("parallel=auto -> %s", result.override())
    return out
