"""Check a checkpoint file before a run resumes from it, so a bad file fails in one clear line.

``torch.save`` writes a zip archive whose central directory sits at the end of the file; a file cut
short (a run killed while writing, a full disk, a partial copy) has none, which ``zipfile`` detects
by reading only the file's tail. Contents are not read here: Lightning loads them, with
``weights_only=True`` (tensors and plain containers only, never arbitrary pickled code).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

# ckpt_path values Lightning resolves itself (see lightning.Trainer.fit)
LIGHTNING_KEYWORDS = ("last", "best", "hpc", "registry")


def check_checkpoint_file(path: str | Path, key: str = "ckpt_path") -> None:
    """Raise ``FileNotFoundError`` / ``ValueError`` naming ``path`` unless it looks like a whole checkpoint."""
    if str(path) in LIGHTNING_KEYWORDS:
        return
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}={path}: no such file; give the path of a .ckpt written by a previous run "
                                f"(e.g. <output_dir>/checkpoints/last.ckpt)")
    if p.is_dir():  # a distributed (sharded) checkpoint: Lightning validates its layout
        return
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{key}={path}: cannot be read as a checkpoint ({e}): the file is truncated or corrupt "
                         f"(a run killed while writing it?); resume from another checkpoint, e.g. an earlier one "
                         f"of the same run, or start without {key}") from e
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise ValueError(f"{key}={path}: is a zip file but not a PyTorch checkpoint (no data.pkl inside); "
                         f"give a .ckpt written by Lightning")
