"""Which ``parallel.split_backward`` / ``parallel.virtual_stages`` settings a run accepts: the planners' copy.

Mirrors the runtime's refusals so that the planners only consider, and ``parallel=auto`` only picks, what a run
then starts with: ``config.check_virtual_stages`` (virtual stages) and ``strategy/split_backward.py``
(``check_split_backward``, ``apply_split_backward``: split backward). A copy, not an import, because planning is
pure (no torch: ``tests/test_plan_layout.py``) and ``apply_split_backward`` looks at a built model. When the
runtime lifts or adds a refusal, change it here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SPLIT_CANDIDATES = (False, True)
VIRTUAL_CANDIDATES = (1, 2)  # v = 2 has most of interleaving's gain; more multiplies the chunks in flight


def refusal(split_backward: bool, virtual: int, *, pp: int, data_parallel: int, num_layers: int,
            layer_checkpoint: str = "none", precision: str = "32-true", lora: bool = False,
            auto: bool = False) -> str | None:
    """Why the runtime refuses ``split_backward`` / ``virtual`` with this layout (the first reason), or None.
    ``data_parallel``: every data-parallel rank of a stage (dp x dp_replicate x dp_shard); ``auto``: the user
    set ``parallel=auto`` (the planner's own picks are written with auto off)."""
    if split_backward:
        if layer_checkpoint != "none":
            return (f"parallel.split_backward=true with chunk.layer_checkpoint={layer_checkpoint}: set "
                    f"chunk.layer_checkpoint=none or parallel.split_backward=false")
        if lora:
            return ("parallel.split_backward=true with model.lora: set parallel.split_backward=false or train "
                    "without model.lora")
        if data_parallel > 1 and precision in ("bf16-mixed", "bf16"):  # "bf16" is trainer.precision's alias
            return ("parallel.split_backward=true with data parallelism under trainer.precision=bf16-mixed: set "
                    "parallel.split_backward=false, trainer.precision=32-true or bf16-true, or no data parallelism")
    if virtual > 1:
        if auto:
            return (f"parallel.virtual_stages={virtual} with parallel=auto: the layout planner picks it; leave "
                    f"parallel.virtual_stages=1")
        if pp == 1:
            return f"parallel.virtual_stages={virtual} with parallel.pp=1: set parallel.virtual_stages=1 or pp > 1"
        if data_parallel > 1:
            return (f"parallel.virtual_stages={virtual} with {data_parallel} data-parallel ranks: set "
                    f"parallel.virtual_stages=1 or no data parallelism")
        if pp * virtual > num_layers:
            return (f"parallel.virtual_stages={virtual} x parallel.pp={pp} blocks for {num_layers} layers: set "
                    f"parallel.virtual_stages=1 or a smaller parallel.pp")
    return None


def user_setting(parallel: Mapping[str, Any]) -> tuple[bool, int]:
    """``(parallel.split_backward, parallel.virtual_stages)`` of a config; false / 1 where the keys are absent."""
    split, virtual = parallel.get("split_backward", False), parallel.get("virtual_stages", 1)
    if not isinstance(split, bool):
        raise ValueError(f"parallel.split_backward={split!r} must be true or false")
    if isinstance(virtual, bool) or not isinstance(virtual, int) or virtual < 1:
        raise ValueError(f"parallel.virtual_stages={virtual!r} must be a positive integer")
    return split, virtual
