"""Train with ChunkFlow: ``python train.py [overrides]`` (Hydra). See README.md for the config groups.

``train(cfg)`` composes the typed pieces and calls ``Trainer.fit``; tests call it directly. ``run(cfg)``
maps its outcome to the exit code (README "Exit codes"): 0 done, 1 error, 128 + signal when stopped
by SIGTERM/SIGUSR1 after saving a resumable checkpoint.
"""

from __future__ import annotations

from chunkflow_pl.utils.held_signals import hold_signals

# Before the heavy imports: a SIGTERM/SIGUSR1 during start-up is held for the pre-emption callback (a clean stop
# before step 1, every rank together) instead of killing this rank alone (chunkflow_pl/utils/held_signals.py).
hold_signals()

import inspect
import logging
import os
import sys
import warnings
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from chunkflow_pl.config import ChunkConfig, ParallelConfig
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.datamodule import ChunkFlowDataModule
from chunkflow_pl.model.attention import resolve_backend
from chunkflow_pl.model.config import ModelSettings
from chunkflow_pl.model.memory import InsufficientMemoryError
from chunkflow_pl.plan.auto import resolve_auto_chunk, resolve_auto_layout
from chunkflow_pl.schedule.executor import StepInterrupted
from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy
from chunkflow_pl.strategy.dims import world_from_launch
from chunkflow_pl.strategy.health import PeerFailure
from chunkflow_pl.strategy.memory_check import MemoryRequest, check_memory, settle_grad_reduce, sharding_of
from chunkflow_pl.strategy.preemption import Preempted
from chunkflow_pl.training.module import ChunkFlowLM
from chunkflow_pl.training.nonfinite import NonFiniteError
from chunkflow_pl.training.optim import OptimConfig
from chunkflow_pl.training.precision import check_precisions
from chunkflow_pl.utils.reproducibility import CNR_DEFAULT, CNR_ENV, mkl_cnr_mode
from chunkflow_pl.utils.run_dir import remove_preemption_checkpoints, resume_policy, this_run_dir_name

log = logging.getLogger("chunkflow_pl")
# hydra.run.dir: outputs/${chunkflow_run_dir:} (chunkflow_pl/utils/run_dir.py: one folder per run)
OmegaConf.register_new_resolver("chunkflow_run_dir", this_run_dir_name, replace=True)

# Lightning.Trainer arguments train.py sets itself, and where the user sets them instead.
TRAINER_RESERVED = {
    "strategy": "ChunkFlowStrategy, built from the chunk and parallel groups",
    "logger": "the logger group (logger=csv|wandb|none)",
    "callbacks": "the callbacks group",
    "default_root_dir": "output_dir (or hydra.run.dir)",
    "use_distributed_sampler": "the datamodule, which shards by data-parallel rank itself",
}
# Errors that end a run with exit code 1 and a one-line message instead of a traceback.
USER_ERRORS = (InsufficientMemoryError, ValueError, FileNotFoundError, NotImplementedError, NonFiniteError,
               PeerFailure)


def _accelerator(name: str) -> tuple[str, torch.device]:
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError("trainer.accelerator=gpu but CUDA is not available; use trainer.accelerator=cpu")
        return "gpu", torch.device("cuda", torch.cuda.current_device())
    if name != "cpu":
        raise ValueError(f"trainer.accelerator={name!r} is not supported; use auto, cpu or gpu")
    return "cpu", torch.device("cpu")


def trainer_options(node: DictConfig) -> dict[str, Any]:
    """The ``trainer`` group as ``lightning.Trainer`` keyword arguments; unknown keys, keys train.py sets and
    values of the wrong type fail here with the key named (instead of a TypeError inside Lightning)."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    params = inspect.signature(L.Trainer.__init__).parameters
    accepted = sorted(k for k in params if k != "self" and k not in TRAINER_RESERVED)
    for key in kwargs:
        if key in TRAINER_RESERVED:
            raise ValueError(f"trainer.{key} is set by train.py ({TRAINER_RESERVED[key]}); remove it")
        if key not in params:
            raise ValueError(f"unknown key trainer.{key}; accepted keys: {', '.join(accepted)}")
    for key in ("max_steps", "max_epochs", "log_every_n_steps", "num_nodes"):
        if key in kwargs and (isinstance(kwargs[key], bool) or not isinstance(kwargs[key], int)):
            raise ValueError(f"trainer.{key}={kwargs[key]!r} must be an integer")
    check_validation_options(kwargs)
    return kwargs


def check_validation_options(kwargs: dict[str, Any]) -> None:
    """Lightning's validation cadence: ``val_check_interval`` (an integer >= 1: every N training steps; a number in
    (0, 1]: a fraction of an epoch) and ``check_val_every_n_epoch`` (an integer >= 1, or null)."""
    v = kwargs.get("val_check_interval")
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or (isinstance(v, float) and v > 1):
            raise ValueError(f"trainer.val_check_interval={v!r} must be an integer >= 1 (every N training steps) or "
                             f"a number in (0, 1] (a fraction of an epoch)")
    n = kwargs.get("check_val_every_n_epoch", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"trainer.check_val_every_n_epoch={n!r} must be an integer >= 1 or null")


def _output_dir(cfg: DictConfig) -> str:
    try:
        return str(cfg.output_dir)
    except Exception:  # no Hydra runtime (compose API): fall back to a local folder
        return "outputs/adhoc"


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    out = []
    for item in (node or {}).values():
        if item is not None and item.get("_target_"):
            out.append(instantiate(item))
    return out


def train(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Compose model, data, strategy, logger and callbacks from ``cfg``; fit; return the live objects.

    ``callbacks`` are added to those of ``cfg.callbacks`` (for programmatic use and tests). Raises
    ``Preempted`` when SIGTERM/SIGUSR1 stopped training (a resumable checkpoint was saved).
    """
    L.seed_everything(int(cfg.seed), workers=True)
    if mkl_cnr_mode() == "OFF":
        log.warning("MKL runs without conditional numerical reproducibility (something ran a CPU matrix product "
                    "before chunkflow_pl was imported): two runs of this command may differ in the last bits. "
                    "Set %s=%s in the environment.", CNR_ENV, CNR_DEFAULT)
    # The module keeps batches on the host on purpose (the executor moves one chunk at a time).
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
    # Every group is typed: unknown keys and wrong types fail here, naming the key.
    check_precisions(cfg.trainer.get("precision", "32-true"), (cfg.get("export") or {}).get("dtype"))
    model = ModelSettings.from_dict(cfg.model)
    mcfg = model.architecture()
    cfg = resolve_auto_layout(cfg, mcfg)  # parallel=auto: the layout planner's pick (chunk.size/k too when auto)
    cfg = resolve_auto_chunk(cfg, mcfg)  # chunk.size=auto: the planner's pick (python -m chunkflow_pl.plan)
    chunk = ChunkConfig.from_dict(cfg.chunk)
    parallel = ParallelConfig.from_dict(cfg.parallel)
    optim = OptimConfig.from_dict(cfg.optim)
    trainer_kwargs = trainer_options(cfg.trainer)
    # trainer.devices defaults to dp x pp; under torchrun / srun the launcher's numbers.
    devices, num_nodes, _ = world_from_launch(trainer_kwargs.get("devices", "auto"),
                                              int(trainer_kwargs.get("num_nodes", 1)), parallel.data_parallel,
                                              parallel.pp, dict(os.environ))
    data_cfg = DataConfig.from_dict(cfg.data)
    if not (data_cfg.val_path or data_cfg.val_fraction):
        # No validation data: no validation loop at all. Lightning's loop state differs when one exists (even an
        # empty one), and a run pre-empted inside its first step then resumed logging from step 1, not 0.
        trainer_kwargs.setdefault("limit_val_batches", 0)
    precision = str(trainer_kwargs.get("precision", "32-true"))
    accelerator, device = _accelerator(str(trainer_kwargs.get("accelerator", "auto")))
    resolve_backend(model.attention, device, precision)  # a bad model.attention fails now, not after tokenising

    # The Python API (README "Use from Python"): the strategy and the datamodule find each other through the
    # Trainer; the strategy checks memory before allocating and handles pre-emption.
    datamodule = ChunkFlowDataModule(data_cfg, chunk_size=chunk.size, vocab_size=mcfg.vocab_size,
                                     max_seq_len=mcfg.max_position_embeddings)
    if cfg.get("dry_run"):
        request = MemoryRequest(mcfg, chunk.size, chunk.k, precision, optim.name, model.loss_chunk,
                                datamodule.longest_sequence(), parallel.pp, lora=model.lora,
                                layer_checkpoint=chunk.layer_checkpoint, sharding=sharding_of(parallel))
        request = settle_grad_reduce(request, parallel.grad_reduce, device.type)
        return {"model_config": mcfg, "memory": check_memory(request, device.type, refuse=False),
                "longest_sequence": request.longest_sequence}
    module = ChunkFlowLM(mcfg, optim, attention=model.attention, loss_chunk=model.loss_chunk,
                         pretrained=model.pretrained, init_std=model.init_std, lora=model.lora,
                         val_position_buckets=data_cfg.val_position_buckets)
    strategy = ChunkFlowStrategy(parallel, chunk_k=chunk.k, offload_state=chunk.offload_state,
                                 layer_checkpoint=chunk.layer_checkpoint,
                                 check_memory=bool(cfg.get("check_memory", True)))

    output_dir = _output_dir(cfg)
    # Never overwrite another run's checkpoints; a folder is reused only to resume (README "Output folders").
    ckpt_path = resume_policy(output_dir, cfg.get("ckpt_path"), os.environ)
    if ckpt_path and ckpt_path != cfg.get("ckpt_path"):
        log.warning("resuming from %s in %s", ckpt_path, output_dir)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    trainer_kwargs.update(accelerator=accelerator, devices=devices, num_nodes=num_nodes)
    trainer = L.Trainer(**trainer_kwargs, strategy=strategy, logger=logger if logger is not None else False,
                        callbacks=[*_instantiate_all(cfg.get("callbacks")), *(callbacks or [])],
                        use_distributed_sampler=False,  # not needed (the datamodule's sampler counts as sharded)
                        default_root_dir=output_dir)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never code to run (the strategy's
        # loader reads every part of its checkpoint that way).
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except StepInterrupted as e:
        stop = strategy.preemption
        if stop is None or stop.signum is None:
            raise
        raise Preempted(stop.signum, stop.checkpoint, stop.detail) from e
    if trainer.is_global_zero:  # spent: this run completed (one rank: concurrent rmtree of one folder fails)
        remove_preemption_checkpoints(output_dir)
    return {"trainer": trainer, "module": module, "datamodule": datamodule, "model_config": mcfg}


def run(cfg: DictConfig, callbacks: list[L.Callback] | None = None) -> int:
    """``train(cfg)`` with its outcome as an exit code; errors are one line on stderr, not a traceback."""
    try:
        train(cfg, callbacks)
    except Preempted as e:
        log.warning("%s", e)
        print(f"preempted: {e}", file=sys.stderr)
        return e.exit_code
    except USER_ERRORS as e:
        log.debug("traceback", exc_info=True)
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _launcher_rank() -> int:
    """Global rank given by an external launcher (torchrun, srun), before any process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


# Under torchrun/srun every rank runs Hydra: only rank 0 writes .hydra/, each rank logs to its own file.
OmegaConf.register_new_resolver("chunkflow_hydra_subdir", lambda: ".hydra" if _launcher_rank() == 0 else None,
                                replace=True)
OmegaConf.register_new_resolver("chunkflow_rank_suffix", lambda: "" if _launcher_rank() == 0 else
                                f"_rank{_launcher_rank()}", replace=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
