"""Checkpoints under any layout: torch.distributed.checkpoint (DCP), keyed by parameter name.

A checkpoint is a directory (named like Lightning's files, e.g. ``last.ckpt/``)::

    last.ckpt/
        .metadata            DCP index: every tensor by name (model.layers.17.attn.q_proj.weight, ...)
        __0_0.distcp ...     tensors; each rank writes the parameters it holds (a pipeline stage's
                             layers; data-parallel replicas are deduplicated by DCP's planner)
        meta.pt              the rest of Lightning's checkpoint (loops, data position, lr schedule,
                             callbacks), written by rank 0, loaded with ``weights_only=True``

Loading asks DCP for exactly the names the loading rank holds, so a run resumes under another layout:
dp=2 from dp=1 and the reverse, a pipeline stage from a whole-model checkpoint. Optimizer state is
keyed by parameter name too (``torch.distributed.checkpoint.state_dict``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

META = "meta.pt"
_DCP_INDEX = ".metadata"


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / _DCP_INDEX).is_file()


def _state(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
    for i, opt in enumerate(optimizers):
        state[f"optimizer_{i}"] = get_optimizer_state_dict(module, opt)
    return state


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path, module: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer], is_global_zero: bool) -> None:
    """Collective (every rank calls it): tensors through DCP, the rest of ``checkpoint`` by rank 0."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if path.is_file():
        path.unlink()  # an older single-file checkpoint of the same name
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = dict(checkpoint)
    checkpoint.pop("state_dict", None)
    checkpoint.pop("optimizer_states", None)
    with warnings.catch_warnings():  # one process without a process group is a supported layout
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        dcp.save(_state(module, optimizers), checkpoint_id=str(path))
    if is_global_zero:
        tmp = path / (META + ".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path / META)


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    with_optimizers: bool = True) -> dict[str, Any]:
    """Load this rank's parameters (and optimizer state) from ``path`` into ``module``/``optimizers``;
    return the rest of the Lightning checkpoint. Raises a clear error for a missing or partial checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    if not is_dcp_checkpoint(path) or not (path / META).is_file():
        raise ValueError(f"ckpt_path={path} is not a complete chunkflow_pl checkpoint directory (it needs "
                         f"{_DCP_INDEX} and {META}); it may have been cut off while being written: resume from "
                         f"an earlier checkpoint")
    state = _state(module, optimizers if with_optimizers else [])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP reports missing keys / bad files as CheckpointException
        raise ValueError(f"ckpt_path={path}: cannot load this rank's tensors ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}); was it written by a different model?") from e
    set_model_state_dict(module, state["state_dict"])
    if with_optimizers:
        for i, opt in enumerate(optimizers):
            set_optimizer_state_dict(module, opt, state[f"optimizer_{i}"])
    try:
        return torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: {META} cannot be read ({type(e).__name__}: {e}); the checkpoint is "
                         f"damaged: resume from an earlier one") from e
