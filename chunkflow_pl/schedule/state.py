"""Key/value state of split sequences, and the gradient flowing back into it.

For every sequence split across chunks and every layer of this stage (keyed by layer name, e.g. ``"17"``,
so a pipeline stage's store holds only its own layers) the store holds::

    k[l], v[l]       [L, Hkv, D]    keys/values (after RoPE) of the processed tokens [0, filled)
    dk[l], dv[l]     [L, Hkv, D]    d loss / d keys, values; later chunks add into [0, their start)
                                    (kept in >= fp32: many chunks add into the same rows)

``L`` (the sequence length) is known before the step, so each buffer is allocated once. Tokens are
written once, in order, and never modified: a chunk's prefix is handed out as the view ``k[l][:start]``
(no copy), and autograd may save that view. Writes go through ``.data`` so they do not bump the version
counter of views saved earlier; they only ever touch rows at or after ``filled``, which no saved
prefix covers. A sequence's entry is freed once the backward of its first chunk is done.

With ``offload=True`` the state lives in host memory (pinned on CUDA) and ``prefix`` hands out host
views too: attention copies a layer's prefix to the device inside its forward and backward and drops
the copy (``model/attention.py``), so autograd keeps only these host views and device memory holds no
prefix beyond the layer being computed. This needs no device->host copy when packing saved tensors
(the prefix is already on the host, written once and never modified), unlike a
``saved_tensors_hooks`` offload of device copies, which would also leave each device copy alive as
the leaf that autograd's gradient accumulator holds. Prefix gradients come back to the host leaves
and are added into the host accumulators. On CUDA both directions run off the compute stream
(``offload.py``): ``add_grad_from`` hands a device gradient to the copy engine, whose worker adds it
into the accumulator once it has landed; ``grad`` and ``free`` first wait for those adds (``drain``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chunkflow_pl.schedule.offload import CopyEngine


@dataclass
class _SeqState:
    seq_len: int
    filled: int = 0
    k: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    dk: dict[str, torch.Tensor | None] = field(default_factory=dict)
    dv: dict[str, torch.Tensor | None] = field(default_factory=dict)


class StateStore:
    def __init__(self, layer_names: list[str], device: torch.device, offload: bool = False,
                 engine: CopyEngine | None = None) -> None:
        self.layer_names = list(layer_names)
        self.device = torch.device(device)
        self.offload = offload
        self.engine = engine  # moves prefix gradients to the host off the compute stream (offload on CUDA)
        self._seqs: dict[int, _SeqState] = {}
        self._bytes = 0
        self.peak_bytes = 0

    @property
    def _storage(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    def _account(self, delta: int) -> None:
        self._bytes += delta
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _buffer(self, like: torch.Tensor, rows: int, dtype: torch.dtype | None = None,
                zero: bool = False) -> torch.Tensor:
        pin = self.offload and self.device.type == "cuda"
        new = torch.zeros if zero else torch.empty  # k/v rows >= filled are never read: no fill needed
        t = new((rows, *like.shape[1:]), dtype=dtype or like.dtype, device=self._storage, pin_memory=pin)
        self._account(t.numel() * t.element_size())
        return t

    def write(self, seq: int, seq_len: int, start: int, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store keys/values of tokens ``[start, start + n)`` of ``seq``; ``kv_per_layer`` follows ``layer_names``."""
        st = self._seqs.get(seq)
        if st is None:
            k0 = kv_per_layer[0][0]
            names = self.layer_names
            st = _SeqState(seq_len, k={n: self._buffer(k0, seq_len) for n in names},
                           v={n: self._buffer(k0, seq_len) for n in names},
                           dk=dict.fromkeys(names), dv=dict.fromkeys(names))
            self._seqs[seq] = st
        if start != st.filled:
            raise RuntimeError(f"state of sequence {seq}: tokens from {start} written after [0, {st.filled})")
        n = kv_per_layer[0][0].shape[0]
        for layer, (k, v) in zip(self.layer_names, kv_per_layer, strict=True):
            st.k[layer].data[start : start + n].copy_(k.detach(), non_blocking=True)
            st.v[layer].data[start : start + n].copy_(v.detach(), non_blocking=True)
        st.filled = start + n

    def prefix(self, seq: int, layer: str, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of tokens ``[0, end)``: views of the store, on the host when offloaded (no copy)."""
        st = self._seqs[seq]
        if end > st.filled:
            raise RuntimeError(f"state of sequence {seq} holds {st.filled} tokens, a chunk needs a prefix of {end}")
        return st.k[layer][:end], st.v[layer][:end]

    def _accumulator(self, seq: int, layer: str, which: str) -> torch.Tensor:
        st = self._seqs[seq]
        if st.dk[layer] is None:
            acc = torch.promote_types(st.k[layer].dtype, torch.float32)
            st.dk[layer] = self._buffer(st.k[layer], st.seq_len, acc, zero=True)
            st.dv[layer] = self._buffer(st.k[layer], st.seq_len, acc, zero=True)
        return st.dk[layer] if which == "k" else st.dv[layer]

    def add_grad(self, seq: int, layer: str, which: str, g: torch.Tensor) -> None:
        """Add ``g``, the gradient of the ``which`` ("k" or "v") prefix ``[0, len(g))`` from a later chunk."""
        buf = self._accumulator(seq, layer, which)
        buf[: g.shape[0]].add_(g.to(buf.device))

    def add_grad_from(self, seq: int, layer: str, which: str, g: torch.Tensor) -> None:
        """``add_grad`` for a gradient on the compute device, through the copy engine: the add happens once
        the copy has landed on the host, in the order of these calls (the same sums as ``add_grad``). Only a
        store with an engine gets these calls: the executor builds a prefix mover only then."""
        rows = self._accumulator(seq, layer, which)[: g.shape[0]]  # allocated here, not on the engine's worker
        self.engine.to_host(g, rows.add_)

    def drain(self) -> None:
        """Wait until every gradient handed to ``add_grad_from`` is in its accumulator."""
        if self.engine is not None:
            self.engine.drain()

    def grad(self, seq: int, layer: str, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Accumulated gradient of tokens ``[start, end)``; None if no later chunk sent any."""
        self.drain()
        st = self._seqs.get(seq)
        if st is None or st.dk[layer] is None:
            return None
        dtype = st.k[layer].dtype
        return (st.dk[layer][start:end].to(self.device, dtype, non_blocking=True),
                st.dv[layer][start:end].to(self.device, dtype, non_blocking=True))

    def free(self, seq: int) -> None:
        self.drain()
        st = self._seqs.pop(seq, None)
        if st is None:
            return
        for t in (*st.k.values(), *st.v.values(), *st.dk.values(), *st.dv.values()):
            if t is not None:
                self._bytes -= t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._seqs)

    def nbytes(self) -> int:
        return self._bytes
