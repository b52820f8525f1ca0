"""ChunkFlowStrategy: a Lightning ``ParallelStrategy`` that runs a global batch as a state-aware chunk plan.

Pattern: Lightning's ``ModelParallelStrategy`` (a mesh, a launcher, distributed checkpoints), not
``DDPStrategy`` (whose DDP wrapper expects one forward per synced backward; a chunk step has many).

The class is what Lightning talks to; each job is a module beside it. Per process (one rank = one
pipeline stage of one data-parallel replica, see ``dims.py``)::

    setup_environment   process groups (Lightning's launcher, torchrun or SLURM): ("pp", "dp") mesh,
                        tie groups, p2p channels                                          groups.py
    configure_model     the LightningModule builds only ``stage_spec``'s layers (names unchanged; with
                        parallel.virtual_stages the rank's blocks, RankBlocks)
    setup               parallel.split_backward: linear layers split into B and W halves  split_backward.py
    run_chunk_step      this rank's stage of its replica's step plan (every rank of a replica derives
                        the same plan from the same StepBatch), through the schedule's StepRunner, one
                        path for every layout; gradients accumulate in ``.grad``          step.py
    setup               dp > 1: each layer and the root an FSDP2 unit over ("dp_replicate", "dp_shard");
                        all-gathered at step start, reduced per backward or per step   sharding.py
    run_eval_step       validation: the same path forward-only (no backward, no gradient), per-token
                        losses summed by position; ``eval_totals`` sums them over the job   step.py
    finish_gradients    tied head summed between first and last stage, global norm over the shards
                        and the pipeline, clipping                                        gradients.py
    export_hf           one Hugging Face directory from all ranks                         export.py
    save/load           torch.distributed.checkpoint directories keyed by parameter name  checkpoint.py
    reduce, barrier...  Lightning's collectives (torch ReduceOp)                          collectives.py

With one process nothing is communicated and the same code runs.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from chunkflow_pl.config import ParallelConfig, check_split_backward
from chunkflow_pl.data.balance import ChunkCost
from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.stages import RankBlocks, StageSpec, rank_blocks, split_stages
from chunkflow_pl.schedule.evaluation import EvalSums
from chunkflow_pl.schedule.executor import StepStats
from chunkflow_pl.schedule.runner import StageTimeline, StepRun, pipeline_cost
from chunkflow_pl.strategy import checkpoint as ckpt
from chunkflow_pl.strategy import collectives
from chunkflow_pl.strategy.dims import ParallelDims
from chunkflow_pl.strategy.export import export_hf
from chunkflow_pl.strategy.fit_setup import layout_dims, prepare_fit
from chunkflow_pl.strategy.gradients import GradGroups, finish_gradients
from chunkflow_pl.strategy.groups import ProcessGroups
from chunkflow_pl.strategy.health import peer_failures
from chunkflow_pl.strategy.layer_checkpoint import apply_layer_checkpoint, check_policy
from chunkflow_pl.strategy.preemption import Preemption
from chunkflow_pl.strategy.sharding import ShardedStage, ShardingSettings, shard_model
from chunkflow_pl.strategy.split_backward import apply_split_backward
from chunkflow_pl.strategy.step import RankStep, StepSettings, comm_device
from chunkflow_pl.utils.held_signals import hold_signals
from chunkflow_pl.utils.sizes import format_duration

log = logging.getLogger(__name__)


class ChunkFlowStrategy(ParallelStrategy):
    strategy_name = "chunkflow"

    def __init__(self, parallel: ParallelConfig | ParallelDims | None = None, chunk_k: int = 1,
                 offload_state: bool = False, num_layers: int | None = None,
                 timeout: timedelta | float | None = None, process_group_backend: str | None = None,
                 check_plan: bool | None = None, check_messages: bool | None = None, check_memory: bool = True,
                 preemption: bool = True, layer_checkpoint: str = "none", split_backward: bool | None = None,
                 **kwargs: Any) -> None:
        """``parallel``: dp x pp (``ParallelConfig``; its world size is checked against the Trainer's devices x
        num_nodes), or a ``ParallelDims`` already sized. ``check_plan`` (default: the config's, True): prove each
        step's plan valid before running it (every layout; ``runner.plan_step``). ``check_messages`` (debug,
        pp > 1): compare plan fingerprints across a replica every step and send a header with every message, so
        diverging ranks fail naming the rank and chunk instead of hanging. ``check_memory``: refuse a run whose
        memory estimate exceeds the device's, before allocating (``memory_check.py``). ``preemption``: add the
        SIGTERM/SIGUSR1 callback (``preemption.py``). ``timeout`` (a timedelta or seconds; default the config's
        ``parallel.collective_timeout``, 10 minutes): how long any collective or point-to-point call of any of the
        run's process groups waits for the other ranks. ``layer_checkpoint`` (``chunk.layer_checkpoint``, ``none`` or
        ``full``): per-layer activation checkpointing inside kept chunks (``layer_checkpoint.py``). ``split_backward``
        (default: the config's ``parallel.split_backward``): split each chunk's backward into B and W actions
        (``split_backward.py``; what it does not run with is refused here). What the strategy does with the Trainer:
        ``fit_setup.py``."""
        super().__init__(**kwargs)
        if chunk_k < 1:
            raise ValueError(f"chunk.k={chunk_k} must be >= 1 (chunks whose activations are kept)")
        self._parallel = parallel if parallel is not None else ParallelConfig()
        # A ParallelConfig is sized when the Trainer gives the devices (_configure_launcher).
        self.dims: ParallelDims | None = self._parallel if isinstance(self._parallel, ParallelDims) else None
        self.chunk_k = int(chunk_k)
        self.offload_state = bool(offload_state)
        self.layer_checkpoint = check_policy(layer_checkpoint)  # a bad value fails here, before anything is built
        self.num_layers = num_layers if num_layers is not None else getattr(self.dims, "num_layers", None)
        self.check_memory = bool(check_memory)
        self.preemption: Preemption | None = Preemption() if preemption else None
        if preemption:  # a signal before fit sets up is held for it (utils/held_signals.py), not obeyed at once
            hold_signals()
        flags = self._parallel if isinstance(self._parallel, ParallelConfig) else ParallelConfig()
        timeout = flags.timeout if timeout is None else timeout
        self.timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._backend = process_group_backend
        self.num_nodes = 1
        self._groups: ProcessGroups | None = None  # more than one process: made by setup_environment
        self._step: RankStep | None = None  # this rank's step runner, made at its first step
        self.should_stop = None  # optional callable polled between chunk actions (signals)
        self.check_plan = bool(flags.check_plan if check_plan is None else check_plan)
        self.check_messages = bool(flags.check_messages if check_messages is None else check_messages)
        self.split_backward = bool(flags.split_backward if split_backward is None else split_backward)
        if self.split_backward:  # before anything is built
            check_split_backward(self.layer_checkpoint)
        self.grad_reduce = flags.grad_reduce  # "auto": settled when sharding (_settle_grad_reduce)
        self.grad_reduce_pick: str | None = None  # auto: this rank's pick from the memory check (fit_setup.py)
        self._sharded: ShardedStage | None = None  # dp > 1: this stage's FSDP2 units (setup)
        # Timeline: a callback sets record_timeline before a step; the step leaves its StageTimeline here.
        self.record_timeline = False
        self.last_timeline: StageTimeline | None = None
        self.last_run: StepRun | None = None  # the last step: this rank's stats, the replica's plan, the record

    # ---- layout ------------------------------------------------------------------------------
    @property
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None, "the strategy has no devices yet"
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 1

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.global_rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.global_rank)[1]

    @property
    def stage_spec(self) -> StageSpec | RankBlocks:
        """What this rank builds: its pipeline stage, or with virtual stages its blocks (``RankBlocks``)."""
        if self.num_layers is None:
            raise RuntimeError("ChunkFlowStrategy needs num_layers to split the model into stages")
        if self.dims.virtual > 1:
            return rank_blocks(self.num_layers, self.dims.pp, self.dims.virtual, self.pp_rank)
        return split_stages(self.num_layers, self.dims.pp)[self.pp_rank]

    def balance_cost(self) -> ChunkCost:
        """What a chunk costs a replica under this layout, for the datamodule's data-parallel balance: the trained
        model's cost model (the one the planner and simulator use), per pipeline stage."""
        return pipeline_cost(self.lightning_module.model_cfg, self.dims.pp, self.dims.virtual).balance_cost()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.dims.dp, "rank": self.dp_rank}

    @property
    def is_distributed(self) -> bool:
        return self.dims.world_size > 1

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self.dims = layout_dims(self._parallel, self.num_nodes * self.num_processes)
        if self.dims.world_size > 1 and not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        self.set_world_ranks()
        if self.world_size != self.dims.world_size:
            raise ValueError(f"Lightning started {self.world_size} processes but parallel.dp x parallel.pp = "
                             f"{self.dims.world_size}")
        prepare_fit(self)  # layout vs model depth, pre-emption callback, memory check: before anything allocates
        if self.dims.world_size == 1:
            return
        self._groups = ProcessGroups.create(self.dims, self.global_rank, self.cluster_environment, self.root_device,
                                            self.num_processes, self._backend, self.timeout, self.check_messages)
        log.info("rank %d: %s process group of %d ranks, collective timeout %s (parallel.collective_timeout)",
                 self.global_rank, self._groups.backend, self.dims.world_size,
                 format_duration(self.timeout.total_seconds()))
        log.info("rank %d: pipeline stage %d/%d (layers %s), data-parallel rank %d/%d, backend %s",
                 self.global_rank, self.pp_rank, self.dims.pp, list(self.stage_spec.layer_ids) if self.num_layers
                 else "?", self.dp_rank, self.dims.dp, self._groups.backend)

    @property
    def device_mesh(self):
        return self._groups.mesh if self._groups is not None else None

    def setup(self, trainer) -> None:
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and getattr(plugin, "scaler", None) is not None:
            raise ValueError("trainer.precision=16-mixed needs loss scaling, which chunked backward does not "
                             "apply; use trainer.precision=bf16-mixed (or 32-true)")
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        assert self.model is not None
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        # Per-layer activation checkpointing, then sharding: from outside the model, before the optimizer is built
        # (torchtitan's order).
        apply_layer_checkpoint(self.lightning_module.model, self.layer_checkpoint)
        if self.split_backward:
            apply_split_backward(self.lightning_module.model, self._sharded_dtypes()[0] if self.dims.sharded else None)
        if self.dims.sharded:
            self._settle_grad_reduce()
            self._sharded = shard_model(self.lightning_module.model, self._groups.dp_mesh,
                                        ShardingSettings(self.grad_reduce, *self._sharded_dtypes()))
        self.barrier("setup")
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _settle_grad_reduce(self) -> None:
        """``parallel.grad_reduce=auto``: every rank takes the same mode, ``every_backward`` if any rank's memory
        check picked it (ranks can see different free memory; different modes would pair different collectives)."""
        if self.grad_reduce != "auto":
            return
        mine = torch.tensor([float(self.grad_reduce_pick == "every_backward")], device=self.root_device)
        self.grad_reduce = "every_backward" if self.reduce(mine, reduce_op="max").item() else "last_backward"

    def _sharded_dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        """FSDP2's (param_dtype, reduce_dtype): bf16-mixed computes with bf16 parameters gathered from fp32 master
        weights and reduces gradients in fp32; other precisions keep the parameters' own dtype."""
        plugin = self.precision_plugin
        if isinstance(plugin, MixedPrecision) and str(plugin.precision).startswith("bf16"):
            return torch.bfloat16, torch.float32
        return None, None

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ---- collectives -------------------------------------------------------------------------
    def _peers_named(self):
        """A collective that fails (a dead peer, or the collective timeout with a stopped one) names the peer."""
        return peer_failures(self.global_rank, self.dims.world_size if self.dims is not None else 1, None)

    def barrier(self, name: str | None = None) -> None:
        with self._peers_named():
            collectives.barrier(self.root_device)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._peers_named():
            return collectives.broadcast(obj, src)

    def reduce(self, tensor: Any, group: Any | None = None,
               reduce_op: dist.ReduceOp | str | None = "mean") -> Any:
        """All-reduce ``tensor`` over ``group``; ``reduce_op``: a ``dist.ReduceOp`` or "mean", "sum", "max", "min"
        (``collectives.py``); any other value raises ``ValueError``."""
        with self._peers_named():
            return collectives.reduce(tensor, group, reduce_op)

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum a few scalars over the data-parallel group (float64, one collective)."""
        group = self._groups.dp if self._groups is not None and self.dims.dp > 1 else None
        return collectives.all_reduce_scalars(values, group, self._comm_device)

    def from_last_stage(self, values: list[float]) -> list[float]:
        """Scalars only the last pipeline stage knows (the loss), made known to every stage."""
        if self._groups is None or self.dims.pp == 1:
            return list(values)
        mine = values if self.stage_spec.has_head else [0.0] * len(values)
        return collectives.all_reduce_scalars(mine, self._groups.pp, self._comm_device)

    @property
    def _comm_device(self) -> torch.device:
        return comm_device(self.root_device)

    # ---- a step ------------------------------------------------------------------------------
    def run_chunk_step(self, model: torch.nn.Module, batch: StepBatch) -> StepStats:
        """Forward/backward every chunk of this rank's ``batch``; gradients accumulate in ``model``'s ``.grad``.

        Every rank holds its data-parallel share of the global batch and runs its pipeline stage of the
        replica's plan (``step.py``; one stage when pp = 1); ``global_*`` stats are summed over data
        parallelism and taken from the last stage.
        """
        record, self.last_timeline, self.last_run = self.record_timeline, None, None
        with peer_failures(self.global_rank, self.dims.world_size, batch.step_index):
            run = self._rank_step().run(model, batch, self._groups, self.should_stop, record, self._sharded)
        self.last_timeline, self.last_run = run.timeline, run
        return run.stats

    def _rank_step(self) -> RankStep:
        if self._step is None:
            self._step = RankStep(self.dims, self.global_rank, self.root_device,
                                  StepSettings(self.chunk_k, self.offload_state, self.check_plan, self.check_messages,
                                               self.split_backward))
        return self._step

    def run_eval_step(self, model: torch.nn.Module, batch: StepBatch, sums: EvalSums) -> StepStats:
        """Forward-only step of this rank's ``batch`` (validation): its stage of the replica's forward-only plan,
        through the same runner as training; the last stage adds every supervised token's loss to ``sums``."""
        with peer_failures(self.global_rank, self.dims.world_size, batch.step_index):
            run = self._rank_step().evaluate(model, batch, self._groups, sums, self._sharded)
        return run.stats

    def eval_totals(self, values: list[float]) -> list[float]:
        """Sums of a validation pass (``EvalSums.values``) over the job: from the last stage, summed over data
        parallelism. The same numbers on every rank."""
        with peer_failures(self.global_rank, self.dims.world_size, None):
            return self.sum_over_dp(self.from_last_stage(values))

    def finish_gradients(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Tie, take the global norm (returned, before clipping), clip if ``max_norm > 0`` (FSDP2 reduced the
        gradients over data parallelism already, at the end of ``run_chunk_step``)."""
        g = self._groups
        groups = GradGroups(g.shard, g.pp, g.tie) if g is not None else GradGroups(None, None, None)
        spec = self.stage_spec if self.num_layers is not None else None
        with peer_failures(self.global_rank, self.dims.world_size, None):
            return finish_gradients(model, max_norm, groups, self.dims.pp, spec)

    # ---- Hugging Face export -----------------------------------------------------------------
    def export_hf(self, model: torch.nn.Module, out_dir, dtype: torch.dtype | None = None,
                  tokenizer_dir=None, merge_lora: bool = False, base_model: str | None = None) -> Path:
        """One Hugging Face checkpoint directory from all ranks (collective: every rank calls it; ``export.py``);
        with LoRA a PEFT adapter folder, or the merged weights (``merge_lora``)."""
        out = Path(self.broadcast(str(out_dir)))
        spec = self.stage_spec if self.dims.pp > 1 else None
        export_hf(model, out, self.dims, self.global_rank, spec, dtype=dtype, tokenizer_dir=tokenizer_dir,
                  merge_lora=merge_lora, base_model=base_model)
        self.barrier("export_hf")
        return out

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # optimizers exist, so their state loads in place

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint already did

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # tensors are written by save_checkpoint through DCP

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return {}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("ChunkFlowStrategy.save_checkpoint does not take storage_options")
        path = Path(self.broadcast(str(filepath)))
        with self._peers_named():  # DCP's collectives
            ckpt.save_checkpoint(checkpoint, path, self.lightning_module, [o for o in self.optimizers],
                                 self.is_global_zero, barrier=self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        return ckpt.load_checkpoint(path, self.lightning_module, list(self.optimizers))

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # done in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # done in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            import shutil

            p = Path(filepath)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()

    def teardown(self) -> None:
        super().teardown()  # process groups stay: Lightning's on_fit_end hooks (the HF export) run after this

    def destroy_process_groups(self) -> None:
        """End every process group of the run, on every rank once it is past its last collective (``train`` calls
        it after ``fit`` returns; it exchanges no message). A no-op with one process or a group made by the caller.
        Why it matters (a gloo thread outliving the interpreter aborts a finished run): ``ProcessGroups.destroy``.
        """
        if self._groups is None or not self._groups.owns_default:
            return
        if self._step is not None:
            self._step.close()  # its runner holds the p2p transport's groups
        self._step = None
        self._groups.destroy()
        self._groups = None
