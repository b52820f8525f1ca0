"""Build a model's parameters on the meta device (shapes, no memory), whatever its constructor computes
on the host (chunkflow_pl's RoPE table is a host-side NumPy table, which a ``torch.device("meta")``
context cannot build)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block moves to the meta device as it is registered,
    before its module initialises it, so the host memory reserved for it is never touched."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
