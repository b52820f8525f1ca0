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

A kill at any moment leaves the previous checkpoint of that name whole. Every rank writes into a staging
folder beside it, and global rank 0 makes it current once every part is on disk (``.metadata`` comes
from DCP after all ranks' shards are written; ``meta.pt`` last)::

    last.ckpt.partial/   written                      (a kill here: last.ckpt is still the previous one)
    last.ckpt -> last.ckpt.old, last.ckpt.partial -> last.ckpt, rm last.ckpt.old
                                                      (a kill between the renames: last.ckpt.old is whole,
                                                       and is what loading and the next save take)

A damaged folder (a shard cut short, no ``.metadata``, tensors of another model) is refused with one
line that names the folder and what is wrong.

Nothing in a checkpoint runs code when it is loaded: ``meta.pt`` is read with ``weights_only=True``, and
DCP's ``.metadata`` (which DCP reads with plain ``pickle``) is first unpickled here with only the classes
DCP writes into it allowed (``_check_metadata``).
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.pt"
UNSTEPPED = "chunkflow_unstepped_optimizers"  # indices of optimizers saved before their first step
_DCP_INDEX = ".metadata"
PARTIAL = ".partial"  # suffix of the folder a save writes into
OLD = ".old"  # suffix of the previous checkpoint during the swap


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


def _check_metadata(path: Path) -> Any:
    """DCP's index, unpickled with only DCP's classes allowed (checked before DCP itself unpickles it)."""
    try:
        with open(path / _DCP_INDEX, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: {_DCP_INDEX} holds more than DCP's index ({type(e).__name__}: {e}); "
                         f"it is damaged or was not written by torch.distributed.checkpoint, and is not loaded "
                         f"(unpickling it could run code): resume from a checkpoint this project wrote") from e


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / _DCP_INDEX).is_file()


def is_complete(path: str | Path) -> bool:
    """Every part a save writes is there (DCP's index, written after all shards, and ``meta.pt``, written last)."""
    return is_dcp_checkpoint(path) and (Path(path) / META).is_file()


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _optim_options(flatten: bool = True):
    """Optimizer state keyed by parameter name throughout (``param_groups.<name>.lr``), not by group index.

    Pipeline stages hold different parameters in their groups, and the nested format's key of a group
    (``optimizer_0.param_groups.0.params``) is the same on every stage: DCP keeps one rank's copy of a key written
    by several, so a stage loaded groups naming another stage's parameters (a pp=2 run resumed from its own
    checkpoint died at its first AdamW step, KeyError 'betas'). ``flatten=False`` reads checkpoints written in the
    nested format before."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flatten)


def _nested_optimizer_format(metadata: Any) -> bool:
    """Written before optimizer state was flattened: its groups are keyed by index."""
    keys = (getattr(metadata, "state_dict_metadata", None) or {}).keys()
    return any(re.match(r"optimizer_\d+\.param_groups\.\d+\.", k) for k in keys)


def _state(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], flatten: bool = True) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"state_dict": get_model_state_dict(module)}
    for i, opt in enumerate(optimizers):
        state[f"optimizer_{i}"] = get_optimizer_state_dict(module, opt, options=_optim_options(flatten))
    return state


def _recover(path: Path) -> None:
    """Rank 0, before a save: finish a swap a kill interrupted, and drop a cut-off staging folder."""
    old, partial = _sibling(path, OLD), _sibling(path, PARTIAL)
    if old.is_dir():
        if path.exists() and is_complete(path):
            shutil.rmtree(old)
        elif is_complete(old):
            if path.is_dir():
                shutil.rmtree(path)
            old.rename(path)
    if partial.exists():
        shutil.rmtree(partial)


def _commit(path: Path, partial: Path) -> None:
    """Rank 0: make the finished staging folder ``path`` (see the module docstring for where a kill may land)."""
    old = _sibling(path, OLD)
    if path.is_file():
        path.unlink()  # an older single-file checkpoint of the same name
    elif path.exists():
        path.rename(old)
    partial.rename(path)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path, module: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer], is_global_zero: bool,
                    barrier: Callable[[str], None] = lambda name: None) -> None:
    """Collective (every rank calls it, with the same ``path``): tensors through DCP, the rest of ``checkpoint``
    by rank 0, into a staging folder that rank 0 makes ``path`` once it is complete. ``barrier`` synchronises
    the ranks (the strategy's)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    partial = _sibling(path, PARTIAL)
    if is_global_zero:
        _recover(path)
        partial.mkdir(parents=True)
    barrier("checkpoint staging")  # the staging folder is new before any rank writes into it
    checkpoint = dict(checkpoint)
    checkpoint.pop("state_dict", None)
    checkpoint.pop("optimizer_states", None)
    # An optimizer that has not stepped yet (a pre-emption inside step 1) has no state, and DCP's state-dict
    # helper creates one with a zero-gradient step (AdamW: step=1): resumed, the first real step would then
    # bias-correct as a second one. Recorded here, undone after saving and after loading.
    checkpoint[UNSTEPPED] = [i for i, opt in enumerate(optimizers) if not opt.state]
    with warnings.catch_warnings():  # one process without a process group is a supported layout
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
        dcp.save(_state(module, optimizers), checkpoint_id=str(partial))
    for i in checkpoint[UNSTEPPED]:
        optimizers[i].state.clear()
    if is_global_zero:  # DCP's save returns on rank 0 once every rank's shards and the index are written
        tmp = partial / (META + ".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(partial / META)
        _commit(path, partial)
    barrier("save_checkpoint")


def readable_checkpoint(path: str | Path) -> Path:
    """The folder to load for ``path``: ``path`` itself, or, when a kill cut a save's swap short, the whole
    previous checkpoint beside it (with a warning). Raises a one-line error naming what is missing."""
    path = Path(path)
    old = _sibling(path, OLD)
    if not is_complete(path) and is_complete(old):
        log.warning("ckpt_path=%s: a save was cut off while making it current; loading the previous complete "
                    "checkpoint %s", path, old)
        return old
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={path} does not exist")
    if not path.is_dir():
        raise ValueError(f"ckpt_path={path} is a file, not a chunkflow_pl checkpoint directory (torch.distributed."
                         f"checkpoint folders hold {_DCP_INDEX} and {META})")
    missing = [n for n in (_DCP_INDEX, META) if not (path / n).is_file()]
    if missing:
        raise ValueError(f"ckpt_path={path} is not a complete chunkflow_pl checkpoint directory: "
                         f"{' and '.join(missing)} missing (it needs {_DCP_INDEX} and {META}); it may have been cut "
                         f"off while being written: resume from an earlier checkpoint")
    return path


def _check_shards(path: Path, metadata: Any) -> None:
    """Every byte range DCP's index points at is inside its file: a shard cut short is named, not guessed at."""
    need: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if isinstance(rel, str):
            need[rel] = max(need.get(rel, 0), int(end))
    for rel, end in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise ValueError(f"ckpt_path={path}: shard {rel} is missing (its index names it); the checkpoint is "
                             f"damaged: resume from an earlier one")
        size = f.stat().st_size
        if size < end:
            raise ValueError(f"ckpt_path={path}: shard {rel} is cut short ({size} bytes, its index needs {end}); the "
                             f"checkpoint is damaged: resume from an earlier one")


def _check_keys(path: Path, metadata: Any, state: dict[str, Any]) -> None:
    """The tensors this rank needs are in the checkpoint (else: written by another model or layout)."""
    stored = set((getattr(metadata, "state_dict_metadata", None) or {}).keys())
    wanted = [f"state_dict.{k}" for k in state["state_dict"]]  # DCP's flattened names
    missing = [k.removeprefix("state_dict.") for k in wanted if k not in stored]
    if stored and missing:
        extra = sorted(k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")
                       and k not in set(wanted))
        raise ValueError(f"ckpt_path={path} was written by another model: {len(missing)} of this model's tensors "
                         f"are not in it (e.g. {', '.join(missing[:3])})"
                         + (f", and it holds others (e.g. {', '.join(extra[:3])})" if extra else "")
                         + "; pass the checkpoint of this model, or change model=/model.overrides to match it")


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                    with_optimizers: bool = True) -> dict[str, Any]:
    """Load this rank's parameters (and optimizer state) from ``path`` into ``module``/``optimizers``;
    return the rest of the Lightning checkpoint. Raises a clear error for a missing or partial checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = readable_checkpoint(path)
    metadata = _check_metadata(path)
    _check_shards(path, metadata)
    flatten = not _nested_optimizer_format(metadata)
    state = _state(module, optimizers if with_optimizers else [], flatten)
    _check_keys(path, metadata, state)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to.*single process.*")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP reports missing keys / bad files as CheckpointException,
        # which is a BaseException, not an Exception
        raise ValueError(f"ckpt_path={path}: cannot load this rank's tensors ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]}); the checkpoint is damaged or of another layout") from e
    set_model_state_dict(module, state["state_dict"])
    try:
        meta = torch.load(path / META, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"ckpt_path={path}: {META} cannot be read ({type(e).__name__}: {e}); the checkpoint is "
                         f"damaged: resume from an earlier one") from e
    if with_optimizers:
        for i, opt in enumerate(optimizers):
            set_optimizer_state_dict(module, opt, state[f"optimizer_{i}"], options=_optim_options(flatten))
            if i in meta.get(UNSTEPPED, ()):  # saved before its first step (save_checkpoint)
                opt.state.clear()
    return meta
