"""Key/value state of split sequences, and the gradient flowing back into it.

For every sequence split across chunks and every layer the store holds the keys/values (after RoPE)
of the sequence's processed pieces, and a gradient accumulator over the whole sequence::

    pieces[l]        [(start_0, k_0, v_0), (start_1, k_1, v_1), ...]   each [n_i, Hkv, D], written once
    dk[l], dv[l]     [L, Hkv, D]    d loss / d keys, values; later chunks add into [0, their start)
                                    (kept in >= fp32: many chunks add into the same rows)

Pieces are written once and never modified: a prefix handed to a chunk may be saved by autograd,
and an in-place write into a shared buffer would invalidate it. ``L`` (the sequence length) is known
before the step, so the accumulator is allocated once. With ``offload=True`` state lives in host
memory (pinned on CUDA) and is copied to the compute device per chunk. A sequence's entry is freed
once the backward of its first chunk is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class _SeqState:
    seq_len: int
    pieces: list[list[tuple[int, torch.Tensor, torch.Tensor]]]
    dk: list[torch.Tensor | None] = field(default_factory=list)
    dv: list[torch.Tensor | None] = field(default_factory=list)


class StateStore:
    def __init__(self, num_layers: int, device: torch.device, offload: bool = False) -> None:
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.offload = offload
        self._seqs: dict[int, _SeqState] = {}
        self._bytes = 0
        self.peak_bytes = 0

    def _to_storage(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if not self.offload:
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.device.type == "cuda")
        return host.copy_(t, non_blocking=True)

    def _account(self, delta: int) -> None:
        self._bytes += delta
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def write(self, seq: int, seq_len: int, start: int, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store keys/values of tokens ``[start, start + n)`` of ``seq`` for every layer."""
        st = self._seqs.get(seq)
        if st is None:
            st = _SeqState(seq_len, [[] for _ in range(self.num_layers)],
                           [None] * self.num_layers, [None] * self.num_layers)
            self._seqs[seq] = st
        for layer, (k, v) in enumerate(kv_per_layer):
            pieces = st.pieces[layer]
            expected = pieces[-1][0] + pieces[-1][1].shape[0] if pieces else 0
            if start != expected:
                raise RuntimeError(f"state of sequence {seq}: piece at {start} written after tokens [0, {expected})")
            pieces.append((start, self._to_storage(k), self._to_storage(v)))
            self._account(2 * k.numel() * k.element_size())

    def prefix(self, seq: int, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of tokens ``[0, end)`` on the compute device (a new tensor or a write-once piece)."""
        pieces = self._seqs[seq].pieces[layer]
        ks = [k for s, k, _ in pieces if s < end]
        vs = [v for s, _, v in pieces if s < end]
        got = sum(k.shape[0] for k in ks)
        if got != end:
            raise RuntimeError(f"state of sequence {seq} holds {got} tokens, a chunk needs a prefix of {end}")
        k = torch.cat(ks) if len(ks) > 1 else ks[0]
        v = torch.cat(vs) if len(vs) > 1 else vs[0]
        return k.to(self.device, non_blocking=True), v.to(self.device, non_blocking=True)

    def add_grad(self, seq: int, layer: int, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """Accumulate the gradient of the prefix ``[0, len(dk))`` coming from a later chunk."""
        st = self._seqs[seq]
        if st.dk[layer] is None:
            like = st.pieces[layer][0][1]
            # Sums over up to L / chunk.size later chunks: accumulate in >= fp32 even for bf16 state.
            acc = torch.promote_types(like.dtype, torch.float32)
            st.dk[layer] = torch.zeros((st.seq_len, *like.shape[1:]), dtype=acc, device=like.device)
            st.dv[layer] = torch.zeros_like(st.dk[layer])
            self._account(2 * st.dk[layer].numel() * st.dk[layer].element_size())
        n = dk.shape[0]
        st.dk[layer][:n].add_(dk.to(st.dk[layer].device))
        st.dv[layer][:n].add_(dv.to(st.dv[layer].device))

    def grad(self, seq: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Accumulated gradient of tokens ``[start, end)``; None if no later chunk sent any."""
        st = self._seqs.get(seq)
        if st is None or st.dk[layer] is None:
            return None
        dtype = st.pieces[layer][0][1].dtype
        return (st.dk[layer][start:end].to(self.device, dtype, non_blocking=True),
                st.dv[layer][start:end].to(self.device, dtype, non_blocking=True))

    def free(self, seq: int) -> None:
        st = self._seqs.pop(seq, None)
        if st is None:
            return
        for layer in range(self.num_layers):
            for _, k, v in st.pieces[layer]:
                self._bytes -= k.numel() * k.element_size() + v.numel() * v.element_size()
            if st.dk[layer] is not None:
                self._bytes -= 2 * st.dk[layer].numel() * st.dk[layer].element_size()

    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def nbytes(self) -> int:
        return self._bytes
