"""Each run gets its own output folder; a folder is reused only to resume the run that owns it.

Folder name (``hydra.run.dir: outputs/${chunkflow_run_dir:}``, resolved once per process)::

    CHUNKFLOW_RUN_ID=abc set            ->  run-abc              any launcher: the value you share
    SLURM batch job 123 (array 7_2)     ->  slurm-123 (slurm-7_2)  the same on every task and requeue
    torchrun with a rendezvous id X     ->  torchrun-X           the same on every rank and restart
    otherwise                           ->  2025-01-31/14-03-27-9f2c1ab0   date, time, 8 random hex

Two processes started in the same second get different random suffixes (2^-32 chance of a clash),
so one never overwrites the other's checkpoints or recorded config. Ranks of one multi-process
launch must all write to one folder: they can only agree on a value they share before any
communication, hence the launcher ids; a multi-process launch without one (``WORLD_SIZE > 1``, no
``CHUNKFLOW_RUN_ID``, torchrun's default rendezvous id ``none``) is refused rather than letting each
rank invent its own folder. Interactive SLURM sessions (job name ``bash``/``interactive``, as
Lightning's ``SLURMEnvironment.detect``) get the per-run random folders.

``resume_policy`` decides what a run does with a folder that already exists (see its docstring).
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

PREEMPT_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's name for a checkpoint saved on a requeue signal
_INTERACTIVE_SLURM = ("bash", "interactive")


class OutputDirInUse(ValueError):
    """The output folder holds checkpoints of another run and this run does not resume it."""


def run_dir_name(env: Mapping[str, str], now: _dt.datetime, token: str) -> str:
    """Folder name below ``outputs/`` for a run started at ``now`` (``token``: this process's random hex)."""
    if env.get("CHUNKFLOW_RUN_ID"):
        return f"run-{_safe(env['CHUNKFLOW_RUN_ID'])}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_SLURM:
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            return f"slurm-{_safe(env['SLURM_ARRAY_JOB_ID'])}_{_safe(env['SLURM_ARRAY_TASK_ID'])}"
        return f"slurm-{_safe(env['SLURM_JOB_ID'])}"
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return f"torchrun-{_safe(env['TORCHELASTIC_RUN_ID'])}"
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("WORLD_SIZE > 1 but nothing tells the ranks which output folder they share: launch with "
                         "torchrun --rdzv-id=<id> (or --standalone), or export CHUNKFLOW_RUN_ID=<id> on every rank, "
                         "or set hydra.run.dir explicitly")
    return f"{now:%Y-%m-%d}/{now:%H-%M-%S}-{token}"


@functools.cache
def this_run_dir_name() -> str:
    """``run_dir_name`` for this process, computed once (Hydra may resolve ``hydra.run.dir`` repeatedly)."""
    return run_dir_name(os.environ, _dt.datetime.now(), secrets.token_hex(4))


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in value)


def is_restart(env: Mapping[str, str]) -> bool:
    """A scheduler restarted this job after it stopped (SLURM requeue, torchrun elastic restart)."""
    return any(int(env.get(k, "0") or 0) > 0 for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"))


def resume_policy(output_dir: str | Path, ckpt_path: str | None, env: Mapping[str, str]) -> str | None:
    """The checkpoint this run resumes from, given what ``output_dir`` already holds.

    * ``ckpt_path`` given: resume from it (the folder may be the one it came from);
    * the folder holds a preemption checkpoint (``hpc_ckpt_N.ckpt``, written on SIGTERM/SIGUSR1):
      ``"hpc"``, i.e. resume from the newest one (a requeued SLURM job, a restarted torchrun); when the
      newest is incomplete (cut off while being written) it is skipped with a warning and the newest
      complete one is returned by path;
    * the job is a restart (``SLURM_RESTART_COUNT``/``TORCHELASTIC_RESTART_COUNT`` > 0): resume from
      ``checkpoints/last.ckpt`` if it exists (or a kill cut its save's swap short, leaving the previous one
      whole as ``last.ckpt.old``), else start over;
    * the folder holds another checkpoint: ``OutputDirInUse`` (never overwrite another run's);
    * otherwise: start fresh (``None``).
    """
    if ckpt_path:
        return ckpt_path
    d = Path(output_dir)
    if any(d.glob(PREEMPT_GLOB)):
        newest = _complete_preemption_checkpoint(d)
        if newest is not None:
            return newest
    last = d / "checkpoints" / "last.ckpt"  # a file, or a directory (torch.distributed.checkpoint)
    if is_restart(env):
        return str(last) if last.exists() or _swap_cut_short(last) else None
    held = sorted(str(p) for p in d.rglob("*.ckpt"))
    if held:
        raise OutputDirInUse(
            f"output folder {d} already holds checkpoints of another run ({', '.join(held[:3])}); to continue that "
            f"run pass ckpt_path={last if last.exists() else held[0]}, to start a new one use another folder "
            f"(drop hydra.run.dir / output_dir, or change CHUNKFLOW_RUN_ID)")
    return None


def _complete_preemption_checkpoint(d: Path) -> str | None:
    """``"hpc"`` (Lightning takes the highest N) when ``hpc_ckpt_N.ckpt`` with the highest N is whole; else the
    path of the highest whole one, with a warning for each skipped; ``None`` when none is whole."""
    from chunkflow_pl.strategy.checkpoint import is_complete  # lazily: the folder format belongs to the strategy

    def number(p: Path) -> int:
        digits = p.name.removeprefix("hpc_ckpt_").removesuffix(".ckpt")
        return int(digits) if digits.isdigit() else -1

    found = sorted(d.glob(PREEMPT_GLOB), key=number, reverse=True)
    for i, p in enumerate(found):
        if p.is_file() or is_complete(p):  # a file: Lightning's single-file format
            return "hpc" if i == 0 else str(p)
        log.warning("skipping the incomplete preemption checkpoint %s (cut off while being written)", p)
    return None


def _swap_cut_short(last: Path) -> bool:
    """A kill between a save's two renames left the previous checkpoint whole as ``last.ckpt.old`` and no
    ``last.ckpt``; loading ``last.ckpt`` reads it (``strategy/checkpoint.py``, ``readable_checkpoint``)."""
    from chunkflow_pl.strategy.checkpoint import is_complete  # lazily: the folder format belongs to the strategy

    return is_complete(last.with_name(last.name + ".old"))


def remove_preemption_checkpoints(output_dir: str | Path) -> list[str]:
    """After the run completes: its preemption checkpoints are spent (a later start must not resume them)."""
    removed = []
    for p in [*Path(output_dir).glob(PREEMPT_GLOB), *Path(output_dir).glob(PREEMPT_GLOB + ".*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(str(p))
    return removed
