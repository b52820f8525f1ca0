"""Data parallelism on FSDP2: a stage's parameters, gradients and optimizer state sharded over ``dp_shard`` ranks,
replicated over ``dp_replicate`` groups of them (HSDP; replicate-only is a shard size of 1).

Applied from outside the model, once, in the strategy's ``setup`` (after layer checkpointing, before the
optimizer is built): each decoder layer is one ``fully_shard`` unit, the root decoder (embedding, final norm,
LM head) another. Parameter names do not change, so checkpoints and exports stay keyed as before.

Why FSDP's own per-forward and per-backward communication is switched off. The data-parallel ranks of a
stage run *different* chunk schedules (their balanced shares of the global batch: other chains, other
dropped and recomputed chunks, padding chunks), so the all-gather FSDP issues in a forward on one rank would
meet a different forward, or a backward, on another. Every collective here is therefore issued at a fixed
point of the step, in a fixed unit order, whatever the chunks::

    step start        unshard every unit (root, then layers 0..N-1): one all-gather each
    chunk actions     forwards, recomputes, backwards: no data-parallel collective (parameters stay
                      unsharded; gradients accumulate unsharded, in FSDP's reduce dtype)
    grad_reduce       every_backward: a reduce after every backward action, then one more per padding
                      chunk at the end (every rank of a stage has the same number of chunks, padding
                      included, so the same number of reduces); only one backward's unsharded gradient
                      lives at a time. last_backward: one reduce after the stage's last action
    step end          the last reduce reshards (frees the unsharded parameters)

A reduce is FSDP's post-backward of every parameter group, called in the unit order (reduce-scatter over
``dp_shard``, then all-reduce over ``dp_replicate``, summed: the loss is already divided by the global
label-token count), the pattern torch's own pipeline schedules use (``PipelineStage.perform_reduce_grad``).
Unused parameters reduce zeros, so every rank reduces the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chunkflow_pl.config import GRAD_REDUCE


@dataclass(frozen=True)
class ShardingSettings:
    grad_reduce: str = "last_backward"
    param_dtype: torch.dtype | None = None  # bf16-mixed: bf16 compute parameters (fp32 master weights)
    reduce_dtype: torch.dtype | None = None  # bf16-mixed: fp32 gradient reduction

    def __post_init__(self) -> None:
        if self.grad_reduce not in GRAD_REDUCE:
            raise ValueError(f"parallel.grad_reduce={self.grad_reduce!r} must be one of {', '.join(GRAD_REDUCE)}")


def shard_model(model: torch.nn.Module, mesh: Any, settings: ShardingSettings) -> ShardedStage:
    """``fully_shard`` each decoder layer, then the root, over ``mesh`` (1-D: shard; 2-D ("dp_replicate",
    "dp_shard"): HSDP). Returns the handle the step uses to unshard and reduce."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from chunkflow_pl.strategy.gloo_comm import AllReduceScatter

    mp = MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=settings.reduce_dtype)
    units = []
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
        register_fsdp_forward_method(layer, "kv")  # the last layer of a dropped forward on the last stage
        units.append(layer)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    register_fsdp_forward_method(model, "loss_sum")  # the chunked loss runs after forward, on the head
    register_fsdp_forward_method(model, "token_losses")  # validation's per-token loss, the same way
    units.insert(0, model)
    shard_group = mesh.get_group(mesh.ndim - 1)  # the shard dim is the last of either mesh
    # gloo's reduce_scatter is 2-3x slower than its all_reduce (strategy/gloo_comm.py); NCCL keeps FSDP2's own
    gloo_reduce = shard_group.size() > 1 and dist.get_backend(shard_group) == "gloo"
    for u in units:
        if gloo_reduce:
            u.set_custom_reduce_scatter(AllReduceScatter())
        u.set_gradient_divide_factor(1.0)  # sum: the loss is scaled by the global label-token count already
        u.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM; the factor is 1 anyway)
        u.set_reduce_scatter_unused_params(True, recurse=False)
        u.set_requires_gradient_sync(False, recurse=False)
        u.set_reshard_after_backward(False, recurse=False)
    return ShardedStage(model, units, settings.grad_reduce)


class ShardedStage:
    """The FSDP units of one stage and the step protocol of the module docstring."""

    def __init__(self, root: torch.nn.Module, units: list[torch.nn.Module], grad_reduce: str) -> None:
        self.root, self.units, self.grad_reduce = root, units, grad_reduce
        self.reduces = 0  # of the current step (tests and the timeline read it)

    def begin_step(self, num_chunks: int) -> None:
        """All-gather every unit, in unit order (every rank of the stage, before any chunk). ``num_chunks``: the
        rank's chunks of the step, padding included (equal on the stage's data-parallel ranks)."""
        self.reduces, self.num_chunks = 0, int(num_chunks)
        from torch.distributed.fsdp import fully_shard

        fully_shard.state(self.root)._lazy_init()  # root-ness and shared state, as the first forward would
        for u in self.units:
            u.unshard()

    def begin_eval(self) -> None:
        """A forward-only (validation) step: all-gather every unit, in unit order, as ``begin_step`` does; nothing
        is reduced after it (no gradient), ``end_eval`` only frees the unsharded parameters."""
        from torch.distributed.fsdp import fully_shard

        fully_shard.state(self.root)._lazy_init()
        for u in self.units:
            u.unshard()

    def end_eval(self) -> None:
        for u in self.units:
            u.reshard()

    def after_backward(self) -> None:
        """Called after every backward action of the step's schedule (a padding chunk has none)."""
        if self.grad_reduce == "every_backward":
            self._reduce(reshard=False)

    def end_step(self) -> None:
        """The step's last reduce (last_backward: its only one), then free the unsharded parameters."""
        if self.grad_reduce == "last_backward":
            self._reduce(reshard=True)
        else:  # the padding chunks' reduces (zeros), so every rank of the stage reduces num_chunks times
            while self.reduces < max(self.num_chunks, 1):
                self._reduce(reshard=False)
        for u in self.units:
            u.reshard()

    def abandon_step(self) -> None:
        """A step stopped at a chunk boundary (a signal): drop its gradients, reshard, without a collective."""
        from torch.distributed.fsdp import fully_shard

        fully_shard.state(self.root)._reset_iter_state()
        for u in self.units:
            for p in u.parameters(recurse=False):
                p.grad = None
        for p in self.root.parameters():
            p.grad = None

    def _reduce(self, reshard: bool) -> None:
        from torch.distributed.fsdp import fully_shard

        for u in self.units:
            u.set_requires_gradient_sync(True, recurse=False)
            u.set_reshard_after_backward(reshard, recurse=False)
        self.root.set_is_last_backward(True)
        state = fully_shard.state(self.root)
        for unit_state in state._state_ctx.all_states:
            for group in unit_state._fsdp_param_groups:
                group.post_backward()
        state._root_post_backward_final_callback()  # waits for the reductions, resets per-backward state
        for u in self.units:
            u.set_requires_gradient_sync(False, recurse=False)
            u.set_reshard_after_backward(False, recurse=False)
        self.reduces += 1
