"""Split backward of the decoder's linear layers (``parallel.split_backward``, zero-bubble pipelines).

A linear layer ``y_TO = x_TI @ W_OI^T + b_O`` has two backward products: ``dx_TI = dy_TO @ W_OI`` (the critical
path: the previous layer, the previous stage and the key/value state gradient wait for it) and
``dW_OI = dy_TO^T @ x_TI`` (nothing waits for it until the optimizer step). Split backward runs them apart::

    BACKWARD(c, split=True)   autograd as usual, but each SplitLinear only stashes (W, x_TI, dy_TO) for chunk c
                              and returns no weight gradient; everything else (input, state, RMSNorm, bias,
                              embedding and LM-head gradients) is computed as in an ordinary backward
    WEIGHT(c)                 WeightGradStash.flush: dW = dy^T @ x for each stashed pair, added to W.grad,
                              in stash order; the stash is freed

So B + W cost one ordinary backward (the same matrix products, none repeated). Which backward a SplitLinear
is in is decided at run time, by ``capture(stash)`` around the chunk's backward call (a module-level slot,
not thread-local: on CUDA autograd runs the backward on a device thread); outside a capture it computes
``dW`` at once, so an unsplit BACKWARD of the same model is an ordinary backward with the same products.

What a pending W keeps alive, per decoder layer and token: the inputs of q/k/v (one tensor, the attention
norm's output, D), o_proj (D), gate/up (the MLP norm's output, D) and down_proj (F), which the forward's
autograd graph kept anyway; and the output gradients of q (Hq*hd), k and v (Dkv each), o_proj (D), gate and
up (F each), down_proj (D). That is (3D + F) + (3D + 2Dkv + 2F) = 6D + 2Dkv + 3F per token and layer (with
Hq*hd = D, as in Qwen2 and Llama), less than the 8D + 2Dkv + 4F a kept chunk's activations are counted at
(``model/memory.py``, ``activation_bytes_per_token_layer``): the chunk's activation slot, held until its W
(``PipelinePlan.caps``), covers it (``tests/test_split_backward_runtime.py`` measures the stash).

Not split (computed in B): the LM head (its output gradient is the chunk's logits gradient, T x vocab, which
the chunked loss never materialises; ``model/loss.py``), the embedding, RMSNorm weights and biases (cheap).

Under autocast the products run in the autocast dtype, as ``F.linear`` would under it: the casted ``x`` and
``W`` are what forward saves and what W multiplies; the weight gradient is cast to ``W``'s dtype when added.

Applied from outside the model, before sharding, like layer checkpointing: each ``nn.Linear`` of the decoder
layers gets its class swapped to ``SplitLinear`` (parameter names, state dicts and exports unchanged).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class WeightGradStash:
    """What one chunk's weight gradients need, from its split backward until its W: ``(W, x_NI, dy_NO)``
    triples in the order the backward produced them (N: every token dimension flattened)."""

    entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, weight: nn.Parameter, x_NI: torch.Tensor, dy_NO: torch.Tensor) -> None:
        self.entries.append((weight, x_NI, dy_NO))

    def flush(self) -> None:
        """Add every stashed ``dy^T @ x`` to its weight's ``.grad`` (what autograd's accumulation would do) and
        free the stash."""
        with torch.no_grad():
            for weight, x_NI, dy_NO in self.entries:
                dw_OI = (dy_NO.t() @ x_NI).to(weight.dtype)
                if weight.grad is None:
                    weight.grad = dw_OI
                else:
                    weight.grad += dw_OI
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


_CAPTURE: list[WeightGradStash] = []  # the stash of the split backward now running (at most one)


@contextmanager
def capture(stash: WeightGradStash):
    """Within: every SplitLinear backward stashes into ``stash`` instead of computing its weight gradient."""
    if _CAPTURE:
        raise RuntimeError("a split backward is already capturing weight gradients (nested split backward)")
    _CAPTURE.append(stash)
    try:
        yield stash
    finally:
        _CAPTURE.pop()


class _SplitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # what F.linear under autocast would multiply
            dtype = torch.get_autocast_dtype(dev)
            x, weight_c = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        else:
            weight_c = weight
        with torch.autocast(dev, enabled=False):
            y = F.linear(x, weight_c, bias)
        ctx.save_for_backward(x, weight_c)
        ctx.weight = weight  # the parameter whose .grad a W adds to (the compute copy may be a cast)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight_c = ctx.saved_tensors
        weight = ctx.weight
        dx = dy @ weight_c if ctx.needs_input_grad[0] else None
        dw = db = None
        if ctx.needs_input_grad[1]:
            x_NI, dy_NO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            if _CAPTURE:
                _CAPTURE[-1].add(weight, x_NI, dy_NO)
            else:
                dw = dy_NO.t() @ x_NI
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, dw, db


class SplitLinear(nn.Linear):
    """An ``nn.Linear`` whose weight gradient can be deferred to a W action (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SplitLinearFn.apply(x, self.weight, self.bias)


def apply_split_linear(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of ``model``'s decoder layers to ``SplitLinear``, in place (idempotent);
    returns how many are split. The LM head (used through ``F.linear`` by the chunked loss) stays as it is."""
    n = 0
    for layer in model.layers.values():
        for name, m in layer.named_modules():
            if isinstance(m, SplitLinear):
                n += 1
            elif type(m) is nn.Linear:
                m.__class__ = SplitLinear
                n += 1
            elif isinstance(m, nn.Linear):
                raise TypeError(f"{name} is a {type(m).__name__}, not a plain nn.Linear: apply split backward "
                                f"before adapters, sharding or other wrappers")
    return n


def has_split_linear(model: nn.Module) -> bool:
    return any(isinstance(m, SplitLinear) for m in model.modules())
