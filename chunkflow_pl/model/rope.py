"""Rotary position embedding (RoPE) tables, computed once per process and gathered per chunk.

Angles are exactly Hugging Face's (``position.float() * inv_freq`` in float32, an exact IEEE product),
so a fine-tuned model sees the positions transformers will give it. Their cos/sin are computed once,
in float64 by NumPy on the host, and cast to the compute dtype::

    inv_freq_F      [F]        F = head_dim / 2, float32, 1 / theta^(2i / head_dim)   (as transformers;
                               Llama 3.1's band scaling applied when the config asks for it)
    angle_NF        [N, F]     float32(position) * inv_freq, positions 0..N-1           (exact product)
    cos_NF, sin_NF  [N, F]     float64 cos/sin of the angles, cast once per (device, dtype)
    cos_TD          [T, D]     cat(cos_NF[position_ids_T], same) -- a gather, so bit-exact

Why not ``emb.cos()`` per chunk as transformers does: on CPU, PyTorch's cos/sin go through MKL's
vector math library, whose result for an element can depend on how MKL splits and aligns the array
(threads, memory alignment), which varies from process to process on some Intel CPUs. A float32 cos
that moves by one ulp in one process moved float64 gradients by 1e-6 (issue 7, item 1). A table built
by NumPy (single-threaded, one code path per element) and gathered is the same in every process, and
float64 cos/sin keep float64 runs exact instead of capping them at float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_MIN_POSITIONS = 4096


def inv_freq(head_dim: int, theta: float, llama3: Llama3Scaling | None = None) -> torch.Tensor:
    """``1 / theta^(2i / head_dim)`` in float32, the way transformers computes it (bit for bit), then Llama 3's
    frequency-band scaling when ``llama3`` is given.

    On the host whatever the default device: Lightning builds the model under ``with torch.device(cuda)``
    (``configure_model``), and the table is NumPy's."""
    inv_F = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    return llama3.apply(inv_F) if llama3 is not None else inv_F


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's RoPE scaling (``rope_type: llama3``): rotations slower than the pre-training context
    (wavelength > original / low) are slowed by ``factor``, fast ones (< original / high) kept, and the band
    between interpolated linearly in ``original / wavelength``::

        wavelength > original / low     inv / factor
        wavelength < original / high    inv
        otherwise                       (1 - s) inv / factor + s inv,   s = (original / wavelength - low) / (high - low)

    Evaluated in float32 in the same operation order as transformers, so the table is bit-identical."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int

    def apply(self, inv_F: torch.Tensor) -> torch.Tensor:
        low, high, orig = self.low_freq_factor, self.high_freq_factor, self.original_max_positions
        wavelen_F = 2 * math.pi / inv_F
        slow_F = torch.where(wavelen_F > orig / low, inv_F / self.factor, inv_F)
        s_F = (orig / wavelen_F - low) / (high - low)
        blended_F = (1 - s_F) * slow_F / self.factor + s_F * slow_F
        band_F = (wavelen_F >= orig / high) & (wavelen_F <= orig / low)
        return torch.where(band_F, blended_F, slow_F)


class RotaryTable:
    """cos/sin for positions ``0 .. N-1``; ``N`` grows (doubling) to the largest position asked for.

    Host memory: ``N x head_dim`` float64 values; per device and dtype one cast copy of the same size.
    A 256K-token sequence with head_dim 128 needs 256 MiB on the host and 128 MiB in float32 on a device.
    """

    def __init__(self, head_dim: int, theta: float, llama3: Llama3Scaling | None = None) -> None:
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")
        self.head_dim = head_dim
        self.theta = float(theta)
        self._inv_freq_F = inv_freq(head_dim, theta, llama3).numpy()
        self._num_positions = 0
        self._host: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cast: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_positions(self) -> int:
        return self._num_positions

    def _grow(self, needed: int) -> None:
        n = max(_MIN_POSITIONS, 1 << (needed - 1).bit_length())
        pos_N = np.arange(n, dtype=np.float32)
        angle_NF = np.multiply.outer(pos_N, self._inv_freq_F)  # float32 x float32: exact IEEE products
        angle_NF = angle_NF.astype(np.float64)
        self._host = (torch.from_numpy(np.cos(angle_NF)), torch.from_numpy(np.sin(angle_NF)))
        self._num_positions = n
        self._cast.clear()

    def table(self, num_positions: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos_NF, sin_NF)`` covering at least ``num_positions`` positions, on ``device`` in ``dtype``."""
        if num_positions > self._num_positions:
            self._grow(num_positions)
        key = (torch.device(device), dtype)
        out = self._cast.get(key)
        if out is None:
            assert self._host is not None
            out = tuple(t.to(device=device, dtype=dtype) for t in self._host)  # type: ignore[assignment]
            self._cast[key] = out
        return out

    def cos_sin(self, position_ids_T: torch.Tensor, num_positions: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos_TD, sin_TD`` [T, head_dim] for ``position_ids_T``, all of which are ``< num_positions``.

        ``num_positions`` comes from the caller's metadata (prefix + own tokens of the longest segment),
        so no device synchronisation is needed to size the table.
        """
        cos_NF, sin_NF = self.table(max(num_positions, 1), position_ids_T.device, dtype)
        c_TF, s_TF = cos_NF.index_select(0, position_ids_T), sin_NF.index_select(0, position_ids_T)
        return torch.cat((c_TF, c_TF), dim=-1), torch.cat((s_TF, s_TF), dim=-1)
