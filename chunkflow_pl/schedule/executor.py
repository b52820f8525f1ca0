"""Run a single-device step plan (forward / recompute / backward actions) on the model.

Each chunk's graph is self-contained: the prefix keys/values it reads from the state store enter
as detached leaves, so backward of one chunk never walks into another's graph. State passing is
explicit instead::

    forward(c):   prefix leaves <- store;  hidden, kv = model(chunk, prefix);  store <- kv (continuing segs)
    backward(c):  autograd.backward([loss_c, kv_c], [1, dkv_c from store]);  store.dkv[:start] += prefix.grad

Backward runs chunks of a sequence in reverse order, so when chunk c runs, every later chunk has
already added the gradient of c's keys/values to the store. A dropped forward (``keep=False``) ran
under ``no_grad`` and is recomputed from the same stored prefix right before its backward; the
same kernels on the same inputs make it bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkflow_pl.data.types import ChunkBatch, Segment, StepBatch
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.schedule.actions import Action, Op
from chunkflow_pl.schedule.state import StateStore


@dataclass
class StepStats:
    loss_sum: float = 0.0  # summed token cross-entropy of this rank's chunks (not normalised)
    tokens: int = 0
    chunks: int = 0
    recomputed_chunks: int = 0
    peak_state_bytes: int = 0
    max_live_activations: int = 0
    # Summed over data-parallel ranks by the strategy (equal to the local values on one device).
    global_loss_sum: float = 0.0
    global_tokens: int = 0


@dataclass
class _Live:
    loss: torch.Tensor  # already divided by the global label-token count
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class ChunkExecutor:
    """Executes actions for the chunks of one ``StepBatch`` on ``model`` (a ``Qwen2Decoder``)."""

    def __init__(self, model: torch.nn.Module, batch: StepBatch, device: torch.device,
                 offload_state: bool = False) -> None:
        self.model = model
        self.batch = batch
        self.device = torch.device(device)
        self.store = StateStore(model.cfg.num_layers, self.device, offload=offload_state)
        self.scale = 1.0 / max(int(batch.num_label_tokens), 1)
        self._live: dict[int, _Live] = {}
        self._on_device: dict[int, ChunkBatch] = {}
        self.stats = StepStats()

    # ---- helpers -----------------------------------------------------------------------------
    def _chunk(self, c: int) -> ChunkBatch:
        cb = self._on_device.get(c)
        if cb is None:
            src = self.batch.chunks[c]
            cb = ChunkBatch(
                input_ids_T=src.input_ids_T.to(self.device, non_blocking=True),
                labels_T=src.labels_T.to(self.device, non_blocking=True),
                position_ids_T=src.position_ids_T.to(self.device, non_blocking=True),
                cu_seqlens_B1=src.cu_seqlens_B1,
                segments=src.segments,
            )
            self._on_device[c] = cb
        return cb

    def _continues(self, seg: Segment) -> bool:
        return seg.end < self.batch.seq_lens[seg.seq]

    @staticmethod
    def _with_prefix(cb: ChunkBatch) -> list[Segment]:
        """Segments that attend to a stored prefix, in the order their prefixes are concatenated."""
        return [s for s in cb.segments if s.start > 0 and s.length > 0]

    def _prefix(self, cb: ChunkBatch, requires_grad: bool):
        """Per layer: ``(ks, vs)``, one prefix per continuing segment, in segment order.

        Each is a detached leaf viewing the store (host memory when offloaded): never concatenated, so
        no prefix is copied per layer. Its gradient is handed to the store as soon as autograd has
        accumulated it, layer by layer, so no prefix-sized gradient outlives its layer's backward.
        """
        segs = self._with_prefix(cb)
        if not segs:
            return None
        leaves = []
        for layer in range(self.model.cfg.num_layers):
            ks, vs = [], []
            for s in segs:
                k, v = (t.detach().requires_grad_(requires_grad) for t in self.store.prefix(s.seq, layer, s.start))
                if requires_grad:
                    k.register_post_accumulate_grad_hook(self._grad_to_store(s.seq, layer, "k"))
                    v.register_post_accumulate_grad_hook(self._grad_to_store(s.seq, layer, "v"))
                ks.append(k)
                vs.append(v)
            leaves.append((tuple(ks), tuple(vs)))
        return leaves

    def _grad_to_store(self, seq: int, layer: int, which: str):
        def hook(leaf: torch.Tensor) -> None:
            self.store.add_grad(seq, layer, which, leaf.grad)
            leaf.grad = None

        return hook

    def _run_forward(self, c: int, grad: bool, write_state: bool) -> _Live | None:
        cb = self._chunk(c)
        if cb.num_tokens == 0:  # padding micro-step of a data-parallel rank: no work
            return _Live(loss=torch.zeros((), device=self.device), kv=[]) if grad else None
        meta = VarlenMeta.from_lengths([s.length for s in cb.segments], [s.start for s in cb.segments])
        prefix = self._prefix(cb, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            hidden_TD, kv = self.model(cb.input_ids_T, cb.position_ids_T, meta, prefix, return_kv=True)
            loss = self.model.loss_sum(hidden_TD, cb.labels_T) * self.scale if grad else None
        if write_state:
            offset = 0
            for s in cb.segments:
                if self._continues(s):
                    self.store.write(s.seq, self.batch.seq_lens[s.seq], s.start,
                                     [(k[offset:offset + s.length], v[offset:offset + s.length]) for k, v in kv])
                offset += s.length
        if not grad:
            return None
        return _Live(loss=loss, kv=kv)

    # ---- actions -----------------------------------------------------------------------------
    def forward(self, c: int, keep: bool) -> None:
        live = self._run_forward(c, grad=keep, write_state=True)
        if keep:
            self._live[c] = live
        self.stats.max_live_activations = max(self.stats.max_live_activations, len(self._live))

    def recompute(self, c: int) -> None:
        # The stored state already holds this chunk's keys/values; recompute only rebuilds the graph.
        self._live[c] = self._run_forward(c, grad=True, write_state=False)
        self.stats.recomputed_chunks += 1
        self.stats.max_live_activations = max(self.stats.max_live_activations, len(self._live))

    def backward(self, c: int) -> None:
        live = self._live.pop(c)
        cb = self._chunk(c)
        outputs, grads = [], []
        if live.loss.requires_grad:
            outputs.append(live.loss)
            grads.append(torch.ones_like(live.loss))
        offset = 0
        for s in cb.segments:
            if self._continues(s):
                for layer, (k, v) in enumerate(live.kv):
                    g = self.store.grad(s.seq, layer, s.start, s.end)
                    if g is not None:
                        outputs += [k[offset:offset + s.length], v[offset:offset + s.length]]
                        grads += [g[0], g[1]]
            offset += s.length
        if outputs:
            torch.autograd.backward(outputs, grads)  # prefix gradients reach the store through hooks
        # The chunk holding a sequence's first piece is the last of that sequence to run backward.
        for s in cb.segments:
            if s.start == 0:
                self.store.free(s.seq)
        self.stats.loss_sum += float(live.loss.detach()) / self.scale
        self.stats.tokens += cb.num_tokens
        self.stats.chunks += 1
        self._on_device.pop(c, None)

    def run(self, actions: list[Action]) -> StepStats:
        for a in actions:
            if a.op is Op.FORWARD:
                self.forward(a.chunk, a.keep)
            elif a.op is Op.RECOMPUTE:
                self.recompute(a.chunk)
            else:
                self.backward(a.chunk)
            self.stats.peak_state_bytes = max(self.stats.peak_state_bytes, self.store.peak_bytes)
        if len(self.store) or self._live:
            raise RuntimeError(f"step plan left state for {len(self.store)} sequences "
                               f"or live chunks {sorted(self._live)}: the plan is incomplete")
        return self.stats
