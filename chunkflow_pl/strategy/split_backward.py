"""``parallel.split_backward``: what it runs with, refused before anything is built, and its application.

Split backward (``model/split_linear.py``) is applied from outside the model in the strategy's ``setup``, after
layer checkpointing and before sharding (torchtitan's order); each step's plan then splits every backward into
B and W actions (``schedule/runner.py``, ``schedule/executor.py``).

With data parallelism (FSDP2, ``strategy/sharding.py``) the parameters stay unsharded for the whole step, so a W
adds to the same unsharded parameter's ``.grad`` autograd would have; the executor calls the stage's
``after_backward`` (the ``every_backward`` reduce) after a split chunk's W, when its gradient is complete, and
``last_backward`` reduces after the stage's last action anyway. What it does not run with yet:

- ``chunk.layer_checkpoint=full`` (refused from the config, ``config.check_split_backward``): a checkpointed layer
  keeps only its input until backward; a pending W would keep every linear layer's recomputed input and output
  gradient instead, beyond what the memory estimate counts for a checkpointed chunk.
- LoRA (``model.lora``): peft's adapter layers are not ``SplitLinear``; untested.
- FSDP2 with a compute dtype other than the parameters' (``trainer.precision=bf16-mixed`` with data parallelism):
  FSDP2 moves each backward's bf16 ``.grad`` into an fp32 accumulator in its post-backward hook, which runs during
  B; a later W's bf16 gradient would be summed in bf16 with the next chunk's before that move, not as unsplit.
"""

from __future__ import annotations

import torch
from torch import nn

from chunkflow_pl.model.lora import lora_of
from chunkflow_pl.model.split_linear import apply_split_linear


def apply_split_backward(model: nn.Module, sharded_param_dtype: torch.dtype | None = None) -> int:
    """Swap the decoder layers' linear layers to ``SplitLinear`` (in place). Refuses a model with LoRA adapters,
    and FSDP2 mixed precision (``sharded_param_dtype``: FSDP2's compute dtype when it differs from the
    parameters', None otherwise or without sharding)."""
    if lora_of(model) is not None:
        raise ValueError("parallel.split_backward=true with model.lora: adapter layers do not split their backward "
                         "yet; set parallel.split_backward=false or train without model.lora")
    if sharded_param_dtype is not None:
        raise ValueError(f"parallel.split_backward=true with data parallelism in {sharded_param_dtype} mixed "
                         "precision (trainer.precision=bf16-mixed): FSDP2's fp32 gradient accumulation would not see "
                         "the deferred weight gradients as unsplit; set parallel.split_backward=false, or "
                         "trainer.precision=32-true or bf16-true, or run without data parallelism")
    return apply_split_linear(model)
