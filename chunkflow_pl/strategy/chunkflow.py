"""ChunkFlowStrategy: a Lightning ``ParallelStrategy`` that runs a global batch as a state-aware chunk plan.

Pattern: Lightning's ``ModelParallelStrategy`` (a mesh, a launcher, distributed checkpoints), not
``DDPStrategy`` (whose DDP wrapper expects one forward per synced backward; a chunk step has many).

Per process (one rank = one pipeline stage of one data-parallel replica, see ``dims.py``)::

    setup_environment   process group (Lightning's launcher, torchrun or SLURM), ("pp", "dp") mesh, groups
    configure_model     the LightningModule builds only ``stage_spec``'s layers (names unchanged)
    run_chunk_step      plan this rank's chunks (all ranks of a replica derive the same plan from the
                        same StepBatch) and execute them; gradients accumulate in ``.grad``. With pp > 1
                        the rank runs its stage's list of the replica's pipeline plan (``pipeline.py``),
                        messages going over one process group per channel (``p2p.py``)
    finish_gradients    tied head summed between first and last stage, gradients all-reduced over dp
                        (bucketed), global norm over the pipeline, clipping
    save/load           torch.distributed.checkpoint directories keyed by parameter name (checkpoint.py)

With one process nothing is communicated and the same code runs.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _init_dist_connection, _set_num_threads_if_needed
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.hf_io import save_hf, save_hf_shard, write_hf_config
from chunkflow_pl.model.stages import StageSpec, split_stages
from chunkflow_pl.schedule.executor import ChunkExecutor, StepStats
from chunkflow_pl.schedule.planner import plan_single_device
from chunkflow_pl.strategy import checkpoint as ckpt
from chunkflow_pl.strategy import grad_sync
from chunkflow_pl.strategy.dims import ParallelDims
from chunkflow_pl.strategy.fit_setup import layout_dims, prepare_fit
from chunkflow_pl.strategy.health import PeerFailure, describe_failure, register_process
from chunkflow_pl.strategy.p2p import P2PTransport
from chunkflow_pl.strategy.pipeline import StageTimeline, compare_plans, pipeline_cost, plan_step
from chunkflow_pl.strategy.preemption import Preemption

log = logging.getLogger(__name__)


class ChunkFlowStrategy(ParallelStrategy):
    strategy_name = "chunkflow"

    def __init__(self, parallel: ParallelConfig | ParallelDims | None = None, chunk_k: int = 1,
                 offload_state: bool = False, num_layers: int | None = None, grad_bucket_mb: float = 25.0,
                 timeout: timedelta = timedelta(minutes=10), process_group_backend: str | None = None,
                 check_plan: bool | None = None, check_messages: bool | None = None, check_memory: bool = True,
                 preemption: bool = True, **kwargs: Any) -> None:
        """``parallel``: dp x pp (``ParallelConfig``; its world size is checked against the Trainer's devices x
        num_nodes), or a ``ParallelDims`` already sized. ``check_plan`` (default: the config's, True): prove each
        step's pipeline plan valid before running it (pp > 1). ``check_messages`` (debug, pp > 1): compare plan
        fingerprints across a replica every step and send a header with every message, so diverging ranks fail
        naming the rank and chunk instead of hanging. ``check_memory``: refuse a run whose memory estimate exceeds
        the device's, before allocating (``memory_check.py``). ``preemption``: add the SIGTERM/SIGUSR1 callback
        (``preemption.py``). What the strategy does with the Trainer: ``fit_setup.py``."""
        super().__init__(**kwargs)
        if chunk_k < 1:
            raise ValueError(f"chunk.k={chunk_k} must be >= 1 (chunks whose activations are kept)")
        self._parallel = parallel if parallel is not None else ParallelConfig()
        # A ParallelConfig is sized when the Trainer gives the devices (_configure_launcher).
        self.dims: ParallelDims | None = self._parallel if isinstance(self._parallel, ParallelDims) else None
        self.chunk_k = int(chunk_k)
        self.offload_state = bool(offload_state)
        self.num_layers = num_layers if num_layers is not None else getattr(self.dims, "num_layers", None)
        self.check_memory = bool(check_memory)
        self.preemption: Preemption | None = Preemption() if preemption else None
        self.grad_bucket_mb = grad_bucket_mb
        self.timeout = timeout
        self._backend = process_group_backend
        self.num_nodes = 1
        self._mesh = None
        self._dp_group = None
        self._pp_group = None
        self._tie_group = None
        self.should_stop = None  # optional callable polled between chunk actions (signals)
        flags = self._parallel if isinstance(self._parallel, ParallelConfig) else ParallelConfig()
        self.check_plan = bool(flags.check_plan if check_plan is None else check_plan)
        self.check_messages = bool(flags.check_messages if check_messages is None else check_messages)
        self._p2p: P2PTransport | None = None
        self._owns_process_group = False  # setup_environment created the default group (destroy_process_groups ends it)
        self._cost = None  # the pipeline's cost model, from the model config (same on every rank)
        # Timeline: a callback sets record_timeline before a step; the step leaves its StageTimeline here.
        self.record_timeline = False
        self.last_timeline: StageTimeline | None = None

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
    def stage_spec(self) -> StageSpec:
        if self.num_layers is None:
            raise RuntimeError("ChunkFlowStrategy needs num_layers to split the model into stages")
        return split_stages(self.num_layers, self.dims.pp)[self.pp_rank]

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
        _set_num_threads_if_needed(num_processes=self.num_processes)
        backend = self._backend or ("nccl" if self.root_device.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"timeout": self.timeout}
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)
        self._owns_process_group = not dist.is_initialized()
        _init_dist_connection(self.cluster_environment, backend, **kwargs)
        from torch.distributed.device_mesh import init_device_mesh

        self._mesh = init_device_mesh(self.root_device.type, self.dims.mesh_shape,
                                      mesh_dim_names=ParallelDims.MESH_DIM_NAMES)
        self._dp_group = self._mesh.get_group("dp")
        self._pp_group = self._mesh.get_group("pp")
        # Tied embeddings across the pipeline: one 2-rank group per replica (every rank creates every group).
        if self.dims.pp > 1:
            for d in range(self.dims.dp):
                ranks = [self.dims.rank(0, d), self.dims.rank(self.dims.pp - 1, d)]
                g = dist.new_group(ranks)
                if self.global_rank in ranks:
                    self._tie_group = g
            # Point-to-point channels of every replica (collective: creates and warms up every group).
            self._p2p = P2PTransport(self.dims, self.global_rank, self._comm_device, self.check_messages)
        register_process(self.global_rank)
        log.info("rank %d: pipeline stage %d/%d (layers %s), data-parallel rank %d/%d, backend %s",
                 self.global_rank, self.pp_rank, self.dims.pp, list(self.stage_spec.layer_ids) if self.num_layers
                 else "?", self.dp_rank, self.dims.dp, backend)

    @property
    def device_mesh(self):
        return self._mesh

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
        self.barrier("setup")
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ---- collectives -------------------------------------------------------------------------
    def barrier(self, name: str | None = None) -> None:
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.root_device.index])
            else:
                dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if not isinstance(tensor, torch.Tensor) or not (dist.is_available() and dist.is_initialized()):
            return tensor
        op = str(reduce_op).lower() if reduce_op is not None else "mean"
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op in ("sum", "mean", "avg", "reduceop.sum") else
                        dist.ReduceOp.MAX if "max" in op else dist.ReduceOp.MIN if "min" in op else dist.ReduceOp.SUM,
                        group=group)
        if op in ("mean", "avg"):
            out = out / dist.get_world_size(group)
        return out

    def sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum a few scalars over the data-parallel group (float64, one collective)."""
        if self._dp_group is None or self.dims.dp == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, group=self._dp_group)
        return t.tolist()

    def from_last_stage(self, values: list[float]) -> list[float]:
        """Scalars only the last pipeline stage knows (the loss), made known to every stage."""
        if self._pp_group is None or self.dims.pp == 1:
            return list(values)
        t = torch.tensor(values if self.stage_spec.has_head else [0.0] * len(values), dtype=torch.float64,
                         device=self._comm_device)
        dist.all_reduce(t, group=self._pp_group)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.root_device if self.root_device.type == "cuda" else torch.device("cpu")

    # ---- a step ------------------------------------------------------------------------------
    def run_chunk_step(self, model: torch.nn.Module, batch: StepBatch) -> StepStats:
        """Forward/backward every chunk of this rank's ``batch``; gradients accumulate in ``model``'s ``.grad``.

        Every rank holds its data-parallel share of the global batch; ``global_*`` stats are summed over
        data parallelism and taken from the last stage.
        """
        try:
            record, self.last_timeline = self.record_timeline, None
            if self.dims.pp > 1:
                stats = self._run_stage(model, batch, record)
            else:
                actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, self.chunk_k)
                t0 = time.perf_counter()
                ex = ChunkExecutor(model, batch, self.root_device, offload_state=self.offload_state,
                                   should_stop=self.should_stop, clock=self._clock() if record else None)
                stats = ex.run(actions)
                if self.root_device.type == "cuda":
                    torch.cuda.synchronize(self.root_device)
                stats.compute_s = time.perf_counter() - t0
                if record:
                    self.last_timeline = StageTimeline(self.global_rank, 0, self.dp_rank, batch.step_index, ex.events,
                                                       stats.max_live_activations, None)
            return self._global_stats(stats)
        except (RuntimeError, dist.DistBackendError) as e:
            self._raise_if_peer_failed(e, batch.step_index)
            raise

    def _run_stage(self, model: torch.nn.Module, batch: StepBatch, record: bool) -> StepStats:
        """This rank's stage of the replica's plan for ``batch`` (every rank of the replica builds the same)."""
        assert self._p2p is not None, "setup_environment creates the pipeline's channels"
        if self._cost is None:
            self._cost = pipeline_cost(model.cfg, self.dims.pp)
        plan = plan_step(batch, self._cost, self.chunk_k, check=self.check_plan)
        if self.check_messages:
            compare_plans(plan, self.global_rank, self._pp_group, self.dims.pp_group_ranks(self.dp_rank),
                          batch.step_index)
        s = self.pp_rank
        actions = plan.stages[s]
        self._p2p.begin_step(batch.step_index, plan.stages, model.cfg.hidden_size, next(model.parameters()).dtype)
        if record:  # a common time origin for the replica's stages
            dist.barrier(group=self._pp_group, **({"device_ids": [self.root_device.index]}
                                                  if self.root_device.type == "cuda" else {}))
        ex = ChunkExecutor(model, batch, self.root_device, offload_state=self.offload_state,
                           transport=self._p2p, should_stop=self.should_stop,
                           clock=self._clock() if record else None)
        t0 = time.perf_counter()
        stats = ex.run(actions)
        if self.root_device.type == "cuda":
            torch.cuda.synchronize(self.root_device)
        stats.compute_s = time.perf_counter() - t0  # message waits included: this rank's time in the plan
        if stats.max_live_activations > plan.caps[s]:
            raise RuntimeError(f"rank {self.global_rank}, stage {s}: {stats.max_live_activations} chunks held "
                               f"activations at once, above the plan's cap {plan.caps[s]} (a runtime bug)")
        if record:
            self.last_timeline = StageTimeline(self.global_rank, s, self.dp_rank, batch.step_index, ex.events,
                                               stats.max_live_activations, plan.caps[s], plan.text(),
                                               {"plan": plan})
        return stats

    def _clock(self):
        """Seconds since now; on CUDA each reading waits for the device (recorded steps only)."""
        t0 = time.perf_counter()
        if self.root_device.type == "cuda":
            device = self.root_device

            def clock() -> float:
                torch.cuda.synchronize(device)
                return time.perf_counter() - t0

            return clock
        return lambda: time.perf_counter() - t0

    def _global_stats(self, stats: StepStats) -> StepStats:
        """Loss and tokens summed over data parallelism (loss from the last stage); compute-time imbalance."""
        loss_sum, tokens, compute_sum = self.sum_over_dp([stats.loss_sum, float(stats.tokens), stats.compute_s])
        (stats.global_loss_sum,) = self.from_last_stage([loss_sum])
        stats.global_tokens = int(tokens)
        if self._dp_group is not None and self.dims.dp > 1:
            slowest = torch.tensor([stats.compute_s], dtype=torch.float64, device=self._comm_device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self._dp_group)
            stats.dp_imbalance = float(slowest) / max(compute_sum / self.dims.dp, 1e-12)
        return stats

    def finish_gradients(self, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
        """Tie, all-reduce over dp, take the global norm (returned, before clipping), clip if ``max_norm > 0``."""
        try:
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            params = grad_sync.ensure_grads(p for _, p in named)
            spec = self.stage_spec if self.num_layers is not None else None
            tied = dict(named).get("embed.weight") if (self.dims.pp > 1 and spec is not None
                                                        and model.cfg.tie_word_embeddings) else None
            grad_sync.tie_embedding_grads(tied, self._tie_group)
            grad_sync.allreduce_grads(params, self._dp_group, self.grad_bucket_mb)
            # The tied head on the last stage duplicates the first stage's embedding: count it once.
            exclude = {id(tied)} if tied is not None and spec is not None and not spec.takes_ids else None
            norm = grad_sync.global_grad_norm(params, self._pp_group, exclude)
            if max_norm > 0:
                grad_sync.clip_grads_(params, max_norm, norm)
            return norm
        except (RuntimeError, dist.DistBackendError) as e:
            self._raise_if_peer_failed(e, None)
            raise

    def _raise_if_peer_failed(self, error: BaseException, step: int | None) -> None:
        if self.dims.world_size > 1:
            msg = describe_failure(self.global_rank, self.dims.world_size, step)
            if msg:
                raise PeerFailure(msg) from error

    # ---- Hugging Face export -----------------------------------------------------------------
    def export_hf(self, model: torch.nn.Module, out_dir, dtype: torch.dtype | None = None,
                  tokenizer_dir=None) -> Path:
        """One Hugging Face checkpoint directory from all ranks (collective: every rank calls it).

        One stage: global rank 0 writes ``model.safetensors``. A pipeline: data-parallel rank 0 of each
        stage writes its shard ``model-0000s-of-0000p.safetensors`` (a tied head is written once, by the
        first stage) and global rank 0 writes the index that joins them, so transformers loads one model.
        """
        out = Path(self.broadcast(str(out_dir)))
        cfg = model.cfg
        if self.dims.pp == 1:
            if self.is_global_zero:
                save_hf(model, cfg, out, dtype=dtype, tokenizer_dir=tokenizer_dir)
            self.barrier("export_hf")
            return out
        weight_map: dict[str, str] = {}
        if self.dp_rank == 0:
            spec = self.stage_spec
            skip = {"embed.weight"} if not spec.takes_ids else None
            name = f"model-{self.pp_rank + 1:05d}-of-{self.dims.pp:05d}.safetensors"
            weight_map = save_hf_shard(model, out, name, dtype=dtype, skip=skip)
        maps: list[Any] = [None] * self.dims.world_size
        dist.all_gather_object(maps, weight_map)
        if self.is_global_zero:
            merged = {k: v for m in maps for k, v in (m or {}).items()}
            dtype_name = str(dtype if dtype is not None else next(model.parameters()).dtype).removeprefix("torch.")
            write_hf_config(out, cfg, merged, dtype_name, tokenizer_dir=tokenizer_dir, index=True)
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
        ckpt.save_checkpoint(checkpoint, path, self.lightning_module, [o for o in self.optimizers],
                             self.is_global_zero)
        self.barrier("save_checkpoint")

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

        Why before the interpreter exits: gloo runs collectives on worker threads, and a worker may drop the last
        reference to a collective's tensor milliseconds after the collective returned (here for about one
        collective in seven). The tensor's Python object is then freed from that thread, which takes the GIL.
        Once the interpreter is finalising, Python ends such a thread with ``pthread_exit``, whose unwinding
        through a C++ ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active
        exception" and SIGABRT after a run that finished. A gloo group joins its threads when its last reference
        goes, so the references held here go first; ``destroy_process_group`` drops torch's own.
        """
        if not self._owns_process_group:
            return
        self._p2p = None
        self._mesh = self._dp_group = self._pp_group = self._tie_group = None
        if dist.is_initialized():
            dist.destroy_process_group()
        self._owns_process_group = False
