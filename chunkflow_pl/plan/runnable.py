"""Which ``parallel.split_backward`` / ``parallel.virtual_stages`` settings a run accepts: the planners' copy.

The planners only consider, and ``parallel=auto`` only picks, what a run then starts with. Virtual stages: the
runtime's own ``config.check_virtual_stages``, plus the layer count. Split backward: the runtime's own
``config.check_split_backward`` (layer checkpointing), and a copy of what ``strategy/split_backward.py``'s
``apply_split_backward`` refuses on the built model (LoRA, FSDP2 mixed precision), because that needs torch and a
model while planning is pure (no torch: ``tests/test_plan_layout.py``); when the runtime lifts or adds one of those,
change it here too.
"""

from __future__ import annotations

from chunkflow_pl.config import check_split_backward, check_virtual_stages

SPLIT_CANDIDATES = (False, True)
VIRTUAL_CANDIDATES = (1, 2)  # v = 2 has most of interleaving's gain; more multiplies the chunks in flight


def refusal(split_backward: bool, virtual: int, *, pp: int, data_parallel: int, num_layers: int,
            layer_checkpoint: str = "none", precision: str = "32-true", lora: bool = False,
            auto: bool = False) -> str | None:
    """Why the runtime refuses ``split_backward`` / ``virtual`` with this layout (the first reason), or None.
    ``data_parallel``: every data-parallel rank of a stage (dp x dp_replicate x dp_shard); ``auto``: the user
    set ``parallel=auto`` (the planner's own picks are written with auto off)."""
    if split_backward:
        try:  # the runtime's own check of the config (config.py is torch-free)
            check_split_backward(layer_checkpoint)
        except ValueError as e:
            return str(e)
        if lora:
            return ("parallel.split_backward=true with model.lora: set parallel.split_backward=false or train "
                    "without model.lora")
        if data_parallel > 1 and precision in ("bf16-mixed", "bf16"):  # "bf16" is trainer.precision's alias
            return ("parallel.split_backward=true with data parallelism under trainer.precision=bf16-mixed: set "
                    "parallel.split_backward=false, trainer.precision=32-true or bf16-true, or no data parallelism")
    if virtual > 1:
        try:  # the runtime's own check (config.py is torch-free)
            check_virtual_stages(virtual, pp, data_parallel, auto)
        except ValueError as e:
            return str(e)
        if pp * virtual > num_layers:
            return (f"parallel.virtual_stages={virtual} x parallel.pp={pp} blocks for {num_layers} layers: set "
                    f"parallel.virtual_stages=1 or a smaller parallel.pp")
    return None
