"""ChunkFlowStrategy: a Lightning strategy that runs a global batch as a state-aware chunk plan.

Single device for now (``dp = pp = 1``): ``run_chunk_step`` plans the micro-step's chunks with the
pure planner (paper Algorithm 2: dependent chunks forward in order, backward in reverse, only the
last ``k`` keep activations) and executes it with the state store. Everything else (optimizer step,
precision, clipping, checkpointing) is Lightning's ``SingleDeviceStrategy``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy

from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.schedule.executor import ChunkExecutor, StepStats
from chunkflow_pl.schedule.planner import plan_single_device


class ChunkFlowStrategy(SingleDeviceStrategy):
    strategy_name = "chunkflow"

    def __init__(self, chunk_k: int = 1, offload_state: bool = False, device: Any = "cpu", **kwargs: Any) -> None:
        super().__init__(device=device, **kwargs)
        if chunk_k < 1:
            raise ValueError(f"chunk.k={chunk_k} must be >= 1 (chunks whose activations are kept)")
        self.chunk_k = int(chunk_k)
        self.offload_state = bool(offload_state)
        # Checked between chunk actions; True abandons the step with StepInterrupted (pre-emption).
        self.should_stop: Callable[[], bool] | None = None

    @property
    def dp_rank(self) -> int:
        return 0

    @property
    def dp_size(self) -> int:
        return 1

    def setup(self, trainer) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and getattr(plugin, "scaler", None) is not None:
            raise ValueError("trainer.precision=16-mixed needs loss scaling, which chunked backward does not "
                             "apply; use trainer.precision=bf16-mixed (or 32-true)")
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # name the file, not a torch traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"ckpt_path={checkpoint_path}: cannot be loaded ({first}); a checkpoint may hold only "
                             f"tensors and plain containers (loaded with weights_only={weights_only}). Resume from "
                             f"a checkpoint this project wrote") from e

    def run_chunk_step(self, model: torch.nn.Module, batch: StepBatch) -> StepStats:
        """Forward/backward every chunk of ``batch``; gradients accumulate in ``model``'s ``.grad``."""
        actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, self.chunk_k)
        stats = ChunkExecutor(model, batch, self.root_device, offload_state=self.offload_state,
                              should_stop=self.should_stop).run(actions)
        stats.global_loss_sum = stats.loss_sum
        stats.global_tokens = stats.tokens
        return stats
