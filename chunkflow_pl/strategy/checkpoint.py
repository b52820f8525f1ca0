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

Nothing in a checkpoint runs code when it is loaded: ``meta.pt`` is read with ``weights_only=True``, and
DCP's ``.metadata`` (which DCP reads with plain ``pickle``) is first unpickled here with only the classes
DCP writes into it allowed (``_check_metadata``).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

META = "meta.pt"
UNSTEPPED = "chunkflow_unstepped_optimizers"  # indices of optimizers saved before their first step
_DCP_INDEX = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP puts in ``.metadata``: its own metadata classes, torch sizes/dtypes/layouts, paths."""

    _EXTRA = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
              ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
              ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        # decide on the names before anything is imported (an import alone can run code)
        if module.startswith("torch.distributed.checkpoint.") or module == "torch" or (module, name) in self._EXTRA:
            obj = super().find_class(module, name)
            if (module, name) in self._EXTRA or isinstance(obj, torch.dtype) or (module != "torch"
                                                                                  and isinstance(obj, type)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


def _check_metadata(path: Path) -> None:
    try:
        with open(path / _DCP_INDEX, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: {_DCP_INDEX} holds more than DCP's index ({type(e).__name__}: {e}); "
                         f"it is damaged or was not written by torch.distributed.checkpoint, and is not loaded "
                         f"(unpickling it could run code): resume from a checkpoint this project wrote") from e


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
    # An optimizer that has not stepped yet (a pre-emption inside step 1) has no state, and DCP's state-dict
    # helper creates one with a zero-gradient step (AdamW: step=1): resumed, the first real step would then
    # bias-correct as a second one. Recorded here, undone after saving and after loading.
    checkpoint[UNSTEPPED] = [i for i, opt in enumerate(optimizers) if not opt.state]
    with warnings.catch_warnings():  # one process without a process group is a supported layout
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        dcp.save(_state(module, optimizers), checkpoint_id=str(path))
    for i in checkpoint[UNSTEPPED]:
        optimizers[i].state.clear()
    if is_global_zero:
        tmp = path / (META + ".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path / META)


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    with_optimizers: bool = True) -> dict[str, Any]:
    """Load this rank's parameters (and optimizer state) from ``path`` into ``module``/``optimizers``;
    return the rest of the Lightning checkpoint. Raises a clear error for a missing or partial checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    if not is_dcp_checkpoint(path) or not (path / META).is_file():
        raise ValueError(f"ckpt_path={path} is not a complete chunkflow_pl checkpoint directory (it needs "
                         f"{_DCP_INDEX} and {META}); it may have been cut off while being written: resume from "
                         f"an earlier checkpoint")
    _check_metadata(path)
    state = _state(module, optimizers if with_optimizers else [])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP reports missing keys / bad files as CheckpointException,
        # which is a BaseException, not an Exception
        raise ValueError(f"ckpt_path={path}: cannot load this rank's tensors ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}); was it written by a different model?") from e
    set_model_state_dict(module, state["state_dict"])
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: {META} cannot be read ({type(e).__name__}: {e}); the checkpoint is "
                         f"damaged: resume from an earlier one") from e
    if with_optimizers:
        for i, opt in enumerate(optimizers):
            set_optimizer_state_dict(module, opt, state[f"optimizer_{i}"])
            if i in meta.get(UNSTEPPED, ()):  # saved before its first step (save_checkpoint)
                opt.state.clear()
    return meta
