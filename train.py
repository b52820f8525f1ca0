"""Train with ChunkFlow: ``python train.py [overrides]`` (Hydra). See README.md for the config groups.

``train(cfg)`` composes the typed pieces and calls ``Trainer.fit``; tests call it directly.
"""

from __future__ import annotations

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

from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.datamodule import ChunkFlowDataModule
from chunkflow_pl.model.attention import resolve_backend
from chunkflow_pl.model.config import ModelConfig, get_preset
from chunkflow_pl.model.memory import InsufficientMemoryError, available_memory, estimate_training_memory
from chunkflow_pl.plan.auto import resolve_auto_chunk
from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy
from chunkflow_pl.strategy.dims import ParallelDims, world_from_launch
from chunkflow_pl.strategy.health import PeerFailure
from chunkflow_pl.training.module import ChunkFlowLM
from chunkflow_pl.training.optim import OptimConfig
from chunkflow_pl.utils.reproducibility import CNR_DEFAULT, CNR_ENV, mkl_cnr_mode
from chunkflow_pl.utils.sizes import parse_size

log = logging.getLogger("chunkflow_pl")


def model_config(node: DictConfig) -> ModelConfig:
    overrides = OmegaConf.to_container(node.get("overrides") or OmegaConf.create({}))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if node.get("pretrained"):
        if overrides:
            raise ValueError(f"model.overrides {sorted(overrides)} cannot change the architecture of "
                             f"model.pretrained={node.pretrained} (its config.json defines it); drop them")
        return ModelConfig.from_hf_dir(node.pretrained)
    return get_preset(node.preset, **overrides)


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

    ``callbacks`` are added to those of ``cfg.callbacks`` (for programmatic use and tests).
    """
    L.seed_everything(int(cfg.seed), workers=True)
    if mkl_cnr_mode() == "OFF":
        log.warning("MKL runs without conditional numerical reproducibility (something ran a CPU matrix product "
                    "before chunkflow_pl was imported): two runs of this command may differ in the last bits. "
                    "Set %s=%s in the environment.", CNR_ENV, CNR_DEFAULT)
    # The module keeps batches on the host on purpose (the executor moves one chunk at a time).
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    warnings.filterwarnings("ignore", message=".*no pre-optimization state was saved.*")
    mcfg = model_config(cfg.model)
    cfg = resolve_auto_chunk(cfg, mcfg)  # chunk.size=auto: the planner's pick (python -m chunkflow_pl.plan)
    chunk_size = parse_size(cfg.chunk.size, key="chunk.size")
    chunk_k = int(cfg.chunk.k)
    dp, pp = int(cfg.parallel.dp), int(cfg.parallel.pp)
    devices, num_nodes, _ = world_from_launch(cfg.trainer.get("devices", "auto"), int(cfg.trainer.get("num_nodes", 1)),
                                              dp, pp, dict(os.environ))
    dims = ParallelDims(dp=dp, pp=pp, world_size=devices * num_nodes, num_layers=mcfg.num_layers)
    optim = OptimConfig.from_dict(OmegaConf.to_container(cfg.optim))
    precision = str(cfg.trainer.precision)
    accelerator, device = _accelerator(str(cfg.trainer.accelerator))
    resolve_backend(str(cfg.model.attention), device, precision)  # a bad combination fails before any work

    max_len = cfg.data.get("max_len")
    max_len = parse_size(max_len, key="data.max_len") if max_len is not None else None
    est = estimate_training_memory(mcfg, chunk_size, chunk_k, precision, optim.name, int(cfg.model.loss_chunk),
                                   max_seq_len=max_len)
    avail = available_memory(device.type)
    log.info("model %s: %.3f B parameters; estimated training memory at %s, chunk.size=%d, k=%d:\n%s\n"
             "  available on %s: %.2f GiB", mcfg.name, mcfg.num_params() / 1e9, precision, chunk_size, chunk_k,
             est.table(), device.type, avail / 2**30)
    if cfg.get("dry_run"):
        return {"model_config": mcfg, "memory": est}
    if cfg.get("check_memory", True) and est.total > avail:
        raise InsufficientMemoryError(
            f"model={mcfg.name} needs about {est.total / 2**30:.1f} GiB to train "
            f"(weights {est.weights / 2**30:.1f}, gradients {est.grads / 2**30:.1f}, {optim.name} state "
            f"{est.optimizer / 2**30:.1f}, activations {est.activations / 2**30:.1f}, K/V state "
            f"{est.state / 2**30:.1f}) but {device.type} has "
            f"{avail / 2**30:.1f} GiB available. Use a machine with more memory, a smaller model "
            f"(model=tiny, model=qwen0.5b), a smaller chunk.size, trainer.precision=bf16-true, optim=sgd, or "
            f"check_memory=false "
            f"to try anyway.")

    data_cfg = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    strategy = ChunkFlowStrategy(dims, chunk_k=chunk_k, offload_state=bool(cfg.chunk.offload_state))
    datamodule = ChunkFlowDataModule(data_cfg, chunk_size=chunk_size, vocab_size=mcfg.vocab_size,
                                     dp_rank=lambda: strategy.dp_rank, dp_size=dims.dp)
    max_steps = int(cfg.trainer.max_steps)
    if max_steps <= 0 and optim.schedule == "cosine":
        raise ValueError("optim.schedule=cosine needs trainer.max_steps > 0 (the decay length); set "
                         "trainer.max_steps or use optim.schedule=constant")
    module = ChunkFlowLM(mcfg, optim, attention=str(cfg.model.attention), loss_chunk=int(cfg.model.loss_chunk),
                         pretrained=cfg.model.get("pretrained"), init_std=float(cfg.model.init_std),
                         total_steps=max(max_steps, 1))

    output_dir = _output_dir(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else None
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs.update(accelerator=accelerator, devices=devices, num_nodes=num_nodes)
    trainer = L.Trainer(**trainer_kwargs, strategy=strategy, logger=logger if logger is not None else False,
                        callbacks=_instantiate_all(cfg.get("callbacks")) + list(callbacks or []),
                        use_distributed_sampler=False,
                        default_root_dir=output_dir)
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    return {"trainer": trainer, "module": module, "datamodule": datamodule, "model_config": mcfg}


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
    try:
        train(cfg)
    except (InsufficientMemoryError, ValueError, FileNotFoundError, NotImplementedError, PeerFailure) as e:
        log.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
