"""Read checkpoints in tests: torch.distributed.checkpoint directories (``last.ckpt/``, see
chunkflow_pl/strategy/checkpoint.py) as plain tensors, their Lightning metadata, and a content digest."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import torch


def checkpoint_meta(path: Path) -> dict:
    """The non-tensor part (global_step, loops, data position, ...)."""
    return torch.load(Path(path) / "meta.pt", map_location="cpu", weights_only=True)


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model parameters by name (``model.embed.weight``, ...)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        dcp_to_torch_save(str(path), str(Path(d) / "flat.pt"))
        return torch.load(Path(d) / "flat.pt", map_location="cpu", weights_only=True)["state_dict"]


def digest(path: Path) -> str:
    """sha256 over every file (name and bytes) of a checkpoint directory, or over one file."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted([path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())):
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
