"""chunkflow_pl: ChunkFlow (chunked long-context fine-tuning) as a PyTorch Lightning module.

The public API, for a plain Lightning script (README "Use from Python")::

    from chunkflow_pl import ChunkFlowDataModule, ChunkFlowLM, ChunkFlowStrategy, DataConfig, OptimConfig, get_preset

``ChunkFlowLM(model_cfg, optim)`` the LightningModule, ``ChunkFlowDataModule(data, chunk_size, vocab_size)`` the
data, ``ChunkFlowStrategy(ParallelConfig(dp, pp), chunk_k, offload_state, layer_checkpoint="none")`` the
strategy; they find each other through the Trainer. The names load on first use, so ``import chunkflow_pl``
stays light (no torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from chunkflow_pl.utils.reproducibility import request_mkl_cnr

# Before anything imports torch and runs a CPU matrix product (see utils/reproducibility.py).
request_mkl_cnr()

__version__ = "0.1.0"

_EXPORTS = {
    "ChunkFlowLM": "chunkflow_pl.training.module",
    "OptimConfig": "chunkflow_pl.training.optim",
    "ChunkFlowDataModule": "chunkflow_pl.data.datamodule",
    "DataConfig": "chunkflow_pl.data.config",
    "ChunkFlowStrategy": "chunkflow_pl.strategy.chunkflow",
    "ParallelConfig": "chunkflow_pl.config",
    "ChunkConfig": "chunkflow_pl.config",
    "ModelConfig": "chunkflow_pl.model.config",
    "ModelSettings": "chunkflow_pl.model.config",
    "get_preset": "chunkflow_pl.model.config",
    "InsufficientMemoryError": "chunkflow_pl.model.memory",
    "Preempted": "chunkflow_pl.strategy.preemption",
    "StepInterrupted": "chunkflow_pl.schedule.executor",
}
__all__ = [  # what _EXPORTS loads
    "ChunkConfig",
    "ChunkFlowDataModule",
    "ChunkFlowLM",
    "ChunkFlowStrategy",
    "DataConfig",
    "InsufficientMemoryError",
    "ModelConfig",
    "ModelSettings",
    "OptimConfig",
    "ParallelConfig",
    "Preempted",
    "StepInterrupted",
    "get_preset",
]

if TYPE_CHECKING:
    from chunkflow_pl.config import ChunkConfig, ParallelConfig
    from chunkflow_pl.data.config import DataConfig
    from chunkflow_pl.data.datamodule import ChunkFlowDataModule
    from chunkflow_pl.model.config import ModelConfig, ModelSettings, get_preset
    from chunkflow_pl.model.memory import InsufficientMemoryError
    from chunkflow_pl.schedule.executor import StepInterrupted
    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy
    from chunkflow_pl.strategy.preemption import Preempted
    from chunkflow_pl.training.module import ChunkFlowLM
    from chunkflow_pl.training.optim import OptimConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'chunkflow_pl' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
