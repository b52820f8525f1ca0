"""Bit-identical results process after process on CPU: MKL's conditional numerical reproducibility.

PyTorch's CPU matrix products run in Intel MKL. Without CNR, MKL may pick its code path per call from
the memory alignment of the operands, which depends on the process's allocation history, so the same
float64 product can round differently in two processes of one command (seen on Intel CPUs: a 1e-12
gradient difference that lr=1e4 turned into 1.5e-8 in the weights). ``MKL_CBWR=AUTO,STRICT`` makes
MKL choose one path for the machine and keep to it whatever the alignment and thread count.

MKL reads the variable once, at its first call, so it must be in the environment before any CPU
matrix product of the process: ``chunkflow_pl`` sets it (unless the user did) when it is imported,
and ``train.py`` imports it first. ``mkl_cnr_mode()`` reports what MKL actually uses, so a program that
ran products before importing chunkflow_pl is told instead of silently losing the guarantee.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

CNR_ENV = "MKL_CBWR"
CNR_DEFAULT = "AUTO,STRICT"


def request_mkl_cnr() -> None:
    """Ask MKL for strict CNR unless the user chose a mode (a no-op once MKL has initialised)."""
    os.environ.setdefault(CNR_ENV, CNR_DEFAULT)


def mkl_cnr_mode() -> str | None:
    """The CNR mode MKL runs with (``"AUTO,STRICT"``, ``"OFF"``, ...), or None without MKL.

    Read from MKL's own verbose line for one tiny float64 product; MKL writes it to file descriptor 1,
    which is redirected to a temporary file for that call.
    """
    import torch

    if not torch.backends.mkl.is_available():
        return None
    a = torch.ones(2, 2, dtype=torch.float64)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                torch.mm(a, a)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    m = re.search(r"CNR:(\S+)", text)
    return m.group(1) if m else None
