"""``parallel.split_backward``: what it runs with, refused before anything is built, and its application.

Split backward (``model/split_linear.py``) is applied from outside the model in the strategy's ``setup``, after
layer checkpointing and before sharding (torchtitan's order); each step's plan then splits every backward into
B and W actions (``schedule/runner.py``, ``schedule/executor.py``). What it does not run with yet:

- ``chunk.layer_checkpoint=full``: a checkpointed layer keeps only its input until backward; a pending W would
  keep every linear layer's recomputed input and output gradient instead, beyond what the memory estimate counts
  for a checkpointed chunk.
- LoRA (``model.lora``): peft's adapter layers are not ``SplitLinear``; untested.
- data parallelism (FSDP2, ``strategy/sharding.py``): its reduce must follow each chunk's W; untested.
"""

from __future__ import annotations

from torch import nn

from chunkflow_pl.model.lora import lora_of
from chunkflow_pl.model.split_linear import apply_split_linear


def check_split_backward(layer_checkpoint: str, data_parallel: int) -> None:
    """Refuse what ``parallel.split_backward=true`` does not run with (knowable from the config alone)."""
    if layer_checkpoint != "none":
        raise ValueError(f"parallel.split_backward=true with chunk.layer_checkpoint={layer_checkpoint}: a pending "
                         "weight action would keep every recomputed linear input and output gradient of the chunk, "
                         "which a checkpointed chunk's memory estimate does not count; set "
                         "chunk.layer_checkpoint=none or parallel.split_backward=false")
    if data_parallel > 1:
        raise ValueError(f"parallel.split_backward=true with {data_parallel} data-parallel ranks: split backward "
                         "does not run on FSDP2 sharding yet; set parallel.split_backward=false or use pp only")


def apply_split_backward(model: nn.Module) -> int:
    """Swap the decoder layers' linear layers to ``SplitLinear`` (in place); refuses a model with LoRA adapters."""
    if lora_of(model) is not None:
        raise ValueError("parallel.split_backward=true with model.lora: adapter layers do not split their backward "
                         "yet; set parallel.split_backward=false or train without model.lora")
    return apply_split_linear(model)
