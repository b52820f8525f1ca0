"""What ``ChunkFlowStrategy`` does with the Trainer it is given, so a plain Lightning script needs no wiring.

``L.Trainer(strategy=ChunkFlowStrategy(...), devices=N)`` then ``trainer.fit(module, datamodule=dm)``::

    Trainer(...)            layout_dims: dp x pp checked against devices x num_nodes (before any process starts)
    setup_environment       prepare_fit, before any process group and before the module allocates anything:
                              the model's depth from the module (pp <= layers),
                              the pre-emption callback first in trainer.callbacks, EndProcessGroups last,
                              the memory check (model, chunk size, k, precision, optimizer, longest sequence)
    datamodule.setup        its data-parallel coordinate from trainer.strategy.distributed_sampler_kwargs
    fit ends                EndProcessGroups.teardown ends the process groups (after every on_fit_end: HF export)
    SIGTERM / SIGUSR1       the pre-emption callback saves a checkpoint; fit raises StepInterrupted and
                            ``strategy.preemption`` holds the signal and the checkpoint path; the groups end

The strategy reads the LightningModule's ``model_cfg``, ``optim_cfg`` and ``loss_chunk`` and the datamodule's
``chunk_size`` and ``longest_sequence()`` (ChunkFlowLM, ChunkFlowDataModule); with another module or data
source the memory check is skipped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning as L

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.model.memory import Sharding
from chunkflow_pl.schedule.executor import StepInterrupted
from chunkflow_pl.strategy.dims import ParallelDims
from chunkflow_pl.strategy.memory_check import MemoryRequest, check_memory, settle_grad_reduce, settled_or_last

if TYPE_CHECKING:
    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy

log = logging.getLogger(__name__)


def layout_dims(parallel: ParallelConfig | ParallelDims, world_size: int) -> ParallelDims:
    """The layout for ``world_size`` processes (Lightning's devices x num_nodes); a mismatch is a ValueError
    naming both numbers."""
    if isinstance(parallel, ParallelDims):
        return parallel
    return ParallelDims(dp=parallel.data_parallel, pp=parallel.pp, world_size=world_size, dp_shard=parallel.dp_shard,
                        virtual=parallel.virtual_stages)


class EndProcessGroups(L.Callback):
    """Ends the strategy's process groups once fit is over on this rank (after every ``on_fit_end``), or after
    a pre-emption checkpoint was written: see ``ChunkFlowStrategy.destroy_process_groups`` for why."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.strategy.destroy_process_groups()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Only a pre-emption: its ranks stopped together and each wrote its part of the checkpoint, so all are
        # past their last collective. After another error a peer may still be inside one.
        preemption = trainer.strategy.preemption
        if isinstance(exception, StepInterrupted) and preemption is not None and preemption.signum is not None:
            trainer.strategy.destroy_process_groups()


def prepare_fit(strategy: ChunkFlowStrategy) -> None:
    """``setup_environment``'s checks and wiring, before any process group or allocation."""
    module = strategy.lightning_module
    trainer = getattr(module, "_trainer", None)  # None: the strategy is driven by hand (tests), not by a Trainer
    cfg = getattr(module, "model_cfg", None)
    if strategy.num_layers is None and cfg is not None:
        strategy.num_layers = cfg.num_layers
    if strategy.num_layers is not None:  # each stage needs a layer: fail here, not in configure_model
        ParallelDims(strategy.dims.dp, strategy.dims.pp, strategy.dims.world_size, strategy.num_layers,
                     strategy.dims.dp_shard, strategy.dims.virtual)
    if trainer is None:
        return
    _attach_callbacks(strategy, trainer.callbacks)
    request = memory_request(strategy, module, trainer.datamodule, str(trainer.precision))
    if request is not None:
        request = settle_grad_reduce(request, strategy.grad_reduce, strategy.root_device.type)
        strategy.grad_reduce_pick = request.sharding.grad_reduce  # ranks agree on it when sharding (chunkflow.py)
        check_memory(request, strategy.root_device.type, refuse=strategy.check_memory)


def _attach_callbacks(strategy: ChunkFlowStrategy, callbacks: list[L.Callback]) -> None:
    # Pre-emption first (as train.py listed it): its on_train_batch_start stops a step before any other
    # callback starts timing it. Ending the groups last: every other teardown / on_exception runs before.
    if strategy.preemption is not None and strategy.preemption not in callbacks:
        callbacks.insert(0, strategy.preemption)
    if not any(isinstance(c, EndProcessGroups) for c in callbacks):
        callbacks.append(EndProcessGroups())


def memory_request(strategy: ChunkFlowStrategy, module: Any, datamodule: Any, precision: str) -> MemoryRequest | None:
    """The memory check's inputs from a ChunkFlowLM and a ChunkFlowDataModule (None for other kinds)."""
    needed = (getattr(module, "model_cfg", None), getattr(module, "optim_cfg", None),
              getattr(datamodule, "chunk_size", None), getattr(datamodule, "longest_sequence", None))
    if any(x is None for x in needed):
        log.info("memory check skipped: it needs a ChunkFlowLM and a ChunkFlowDataModule")
        return None
    cfg, optim, chunk_size, longest = needed
    dims = strategy.dims
    return MemoryRequest(cfg, int(chunk_size), strategy.chunk_k, precision, optim.name, int(module.loss_chunk),
                         int(longest()), dims.pp, lora=getattr(module, "lora", None),
                         layer_checkpoint=strategy.layer_checkpoint, virtual=dims.virtual,
                         sharding=Sharding(dims.dp_shard, dims.dp_replicate, settled_or_last(strategy.grad_reduce)))
