"""Run one pipeline stage's step plan (paper Algorithm 2, and its pipelined form) on its model part.

A stage executor owns the stage's state store and runs actions for the chunks of one ``StepBatch``::

    recv_act(c)    the residual stream of chunk c from the previous stage      (not on the first stage)
    forward(c)     this stage's layers on c; store its keys/values; keep activations or drop them
    send_act(c)    the output to the next stage                                 (not on the last stage)
    recompute(c)   re-run a dropped forward from the stage's own saved input (never a re-send)
    recv_grad(c)   d loss / d output from the next stage                        (not on the last stage)
    backward(c)    autograd through c, fed the stored gradient of c's keys/values from later chunks
    send_grad(c)   d loss / d input to the previous stage                       (not on the first stage)
    weight(c)      after a split backward(c) (``Action.split``): add c's stashed linear-weight gradients

Split backward (``parallel.split_backward``; ``model/split_linear.py``): ``backward(c, split=True)`` runs the
same autograd call inside ``capture(stash)``, so the decoder's ``SplitLinear`` layers stash
``(W, x, d out)`` instead of computing ``dW``; the input gradient, the key/value state gradients and the cheap
parameter gradients (norms, biases, embedding, LM head) are produced exactly as unsplit. ``weight(c)``, later
(other chunks' actions in between, in any order the plan gives), adds ``d out^T @ x`` to each ``.grad`` and
frees the stash. The chunk counts as live (``max_live_activations``, checked against the plan's cap) until its
weight action, and ``after_backward`` runs after the weight action instead of the backward (the chunk's
gradient is complete only then).

With one stage (pp = 1) only forward / recompute / backward occur and the transport is never used.

Evaluation (``evaluation`` given: validation): the plan is forward-only (``schedule/evaluation.py``). Each
forward runs under ``no_grad``, writes the keys/values of continuing segments to the store as in training, frees
a sequence's state at its last chunk (no backward will read it), and on the last stage adds its per-token losses
by position to ``evaluation``. Backward, recompute and kept forwards are refused.

Each chunk's graph is self-contained: the prefix keys/values it reads from the state store enter as
detached leaves, so backward of one chunk never walks into another's graph. State passing is explicit::

    forward(c):   prefix leaves <- store;  out, kv = stage(chunk, prefix);  store <- kv (continuing segs)
    backward(c):  autograd.backward([out_c, kv_c], [d out_c, dkv_c from store]);  store.dkv[:start] += prefix.grad

Backward runs the chunks of a sequence in reverse order, so when chunk c runs, every later chunk has
already added the gradient of c's keys/values to the store. A dropped forward ran under ``no_grad``
and is recomputed from the same stored prefix right before its backward; the same kernels on the
same inputs make it bit-identical. A stage other than the first keeps the input of a dropped chunk
(``[T, D]``, a boundary checkpoint) for that recompute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from chunkflow_pl.data.types import ChunkBatch, Segment, StepBatch
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.split_linear import WeightGradStash, capture, has_split_linear
from chunkflow_pl.schedule.evaluation import EvalSums
from chunkflow_pl.schedule.offload import CopyEngine, PrefixMover, copy_engine_for
from chunkflow_pl.schedule.state import StateStore
from chunkflow_pl.schedule.transport import ACT, GRAD, LocalTransport, Transport


@dataclass
class StepStats:
    loss_sum: float = 0.0  # summed token cross-entropy of this rank's chunks (last stage; not normalised)
    tokens: int = 0
    chunks: int = 0
    recomputed_chunks: int = 0
    peak_state_bytes: int = 0
    max_live_activations: int = 0
    # Summed over data-parallel ranks (and taken from the last stage) by the strategy.
    global_loss_sum: float = 0.0
    global_tokens: int = 0
    compute_s: float = 0.0  # this rank's time in the plan (before any gradient collective)
    dp_imbalance: float = 1.0  # max / mean of compute_s over data-parallel ranks


@dataclass
class _Live:
    inp: torch.Tensor  # ids (first stage) or a leaf requiring grad (others)
    out: torch.Tensor  # loss already divided by the global label-token count (last stage), else [T, D]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class ChunkExecutor:
    """Executes actions of one stage for the chunks of one ``StepBatch`` on ``model`` (a ``Qwen2Decoder``,
    whole or one stage of it; ``model.stage`` says which).

    ``transport`` connects it to the neighbouring stages (unused when the model is whole).
    ``should_stop`` is polled between actions; when it returns True the step is abandoned with
    ``StepInterrupted`` (chunk boundaries are the only safe places to stop a step).
    ``clock`` (off by default): when given, ``run`` records ``(op, chunk, start, end)`` of every action
    it runs in ``events``, timed with it (the timeline of a step).
    ``after_backward`` (when given) runs after every backward action, a padding chunk's too, so every
    data-parallel rank of a stage calls it equally often (a sharded stage reduces its gradients there); after
    a split backward it runs after the chunk's weight action instead.
    """

    def __init__(self, model: torch.nn.Module, batch: StepBatch, device: torch.device,
                 offload_state: bool = False, transport: Transport | None = None,
                 should_stop: Callable[[], bool] | None = None, clock: Callable[[], float] | None = None,
                 copy_engine: CopyEngine | None = None, after_backward: Callable[[], None] | None = None,
                 evaluation: EvalSums | None = None) -> None:
        self.model = model
        self.evaluation = evaluation
        self.after_backward = after_backward
        self.stage = model.stage
        self.batch = batch
        self.device = torch.device(device)
        self.layer_names = model.layer_names
        # Offloaded state on CUDA: prefixes and their gradients move off the compute stream (offload.py).
        self.copy_engine = copy_engine if copy_engine is not None else copy_engine_for(self.device, offload_state)
        self.store = StateStore(self.layer_names, self.device, offload=offload_state, engine=self.copy_engine)
        self.transport = transport if transport is not None else LocalTransport()
        self.should_stop = should_stop
        self.scale = 1.0 / max(int(batch.num_label_tokens), 1)
        self.act_dtype = next(model.parameters()).dtype  # the residual stream's dtype (fp32 under autocast)
        self._live: dict[int, _Live] = {}
        self._on_device: dict[int, ChunkBatch] = {}
        self._inbox: dict[int, torch.Tensor] = {}  # received inputs, until their forward
        self._saved_input: dict[int, torch.Tensor] = {}  # inputs of dropped forwards, until their recompute
        self._outbox: dict[int, torch.Tensor] = {}  # outputs, until sent
        self._grad_in: dict[int, torch.Tensor] = {}  # received output gradients, until backward
        self._grad_out: dict[int, torch.Tensor] = {}  # input gradients, until sent
        self._awaiting_w: dict[int, WeightGradStash] = {}  # split backwards' stashes, until their weight action
        self.stats = StepStats()
        self.clock = clock
        self.events: list[tuple[str, int, float, float]] = []  # (op, chunk, start, end), when clock is given

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

    def _hidden_shape(self, c: int) -> tuple[int, int]:
        return (self.batch.chunks[c].num_tokens, self.model.cfg.hidden_size)

    def _continues(self, seg: Segment) -> bool:
        return seg.end < self.batch.seq_lens[seg.seq]

    @staticmethod
    def _with_prefix(cb: ChunkBatch) -> list[Segment]:
        """Segments that attend to a stored prefix, in the order their prefixes are concatenated."""
        return [s for s in cb.segments if s.start > 0 and s.length > 0]

    def _prefix(self, cb: ChunkBatch, requires_grad: bool):
        """Per layer: ``(ks, vs)``, one prefix per continuing segment, in segment order; and the chunk's
        ``PrefixMover`` when a copy engine moves them (else None).

        Each is a detached leaf viewing the store (host memory when offloaded): never concatenated, so
        no prefix is copied per layer. Its gradient is handed to the store as soon as autograd has
        accumulated it, layer by layer, so no prefix-sized gradient outlives its layer's backward. With a
        mover, attention hands the gradients to the mover instead, which sends them to the store.
        """
        segs = self._with_prefix(cb)
        if not segs:
            return None, None
        hooks = requires_grad and self.copy_engine is None
        leaves = []
        for layer in self.layer_names:
            ks, vs = [], []
            for s in segs:
                k, v = (t.detach().requires_grad_(hooks) for t in self.store.prefix(s.seq, layer, s.start))
                if hooks:
                    k.register_post_accumulate_grad_hook(self._grad_to_store(s.seq, layer, "k"))
                    v.register_post_accumulate_grad_hook(self._grad_to_store(s.seq, layer, "v"))
                ks.append(k)
                vs.append(v)
            leaves.append((tuple(ks), tuple(vs)))
        if self.copy_engine is None:
            return leaves, None

        def on_grad(i: int, j: int, g: torch.Tensor) -> None:  # j-th of layer i's (*ks, *vs)
            which, s = ("k", segs[j]) if j < len(segs) else ("v", segs[j - len(segs)])
            self.store.add_grad_from(s.seq, self.layer_names[i], which, g)

        return leaves, PrefixMover(leaves, self.copy_engine, on_grad)

    def _grad_to_store(self, seq: int, layer: str, which: str):
        def hook(leaf: torch.Tensor) -> None:
            self.store.add_grad(seq, layer, which, leaf.grad)
            leaf.grad = None

        return hook

    def _input(self, c: int, cb: ChunkBatch, recompute: bool) -> torch.Tensor:
        if self.stage.takes_ids:
            return cb.input_ids_T
        box = self._saved_input if recompute else self._inbox
        if c not in box:
            what = "its saved input" if recompute else "a receive of its input"
            raise RuntimeError(f"stage {self.stage}: {'recompute' if recompute else 'forward'} of chunk {c} "
                               f"without {what}: the plan is out of order")
        return box.pop(c)

    def _run_forward(self, c: int, grad: bool, recompute: bool) -> _Live | None:
        cb = self._chunk(c)
        inp = self._input(c, cb, recompute)
        if grad and not self.stage.takes_ids:
            inp = inp.detach().requires_grad_(True)
        elif not grad and not self.stage.takes_ids:
            self._saved_input[c] = inp  # boundary checkpoint for the recompute
        prefix, mover = self._prefix(cb, requires_grad=grad)
        meta = VarlenMeta.from_lengths([s.length for s in cb.segments], [s.start for s in cb.segments], mover)
        # A dropped forward on the last stage is run for its keys/values only: the model skips what comes
        # after the last layer's k/v projections (a recompute redoes the whole chunk with autograd anyway).
        kv_only = not grad and self.stage.has_head
        with torch.set_grad_enabled(grad):
            hidden, kv = self.model(inp, cb.position_ids_T, meta, prefix, return_kv=True, kv_only=kv_only)
            if self.stage.has_head:
                out = self.model.loss_sum(hidden, cb.labels_T) * self.scale if grad else None
            else:
                out = hidden
        if mover is not None:
            mover.close()
        if not recompute:  # the stored state already holds a recomputed chunk's keys/values
            offset = 0
            for s in cb.segments:
                if self._continues(s):
                    self.store.write(s.seq, self.batch.seq_lens[s.seq], s.start,
                                     [(k[offset:offset + s.length], v[offset:offset + s.length]) for k, v in kv])
                offset += s.length
            if not self.stage.has_head:
                self._outbox[c] = hidden.detach()
        if not grad:
            return None
        return _Live(inp=inp, out=out, kv=kv)

    def _run_eval(self, c: int) -> None:
        cb = self._chunk(c)
        inp = self._input(c, cb, recompute=False)
        prefix, mover = self._prefix(cb, requires_grad=False)
        meta = VarlenMeta.from_lengths([s.length for s in cb.segments], [s.start for s in cb.segments], mover)
        with torch.no_grad():
            hidden, kv = self.model(inp, cb.position_ids_T, meta, prefix, return_kv=True)
            if mover is not None:
                mover.close()
            offset = 0
            for s in cb.segments:
                if self._continues(s):
                    self.store.write(s.seq, self.batch.seq_lens[s.seq], s.start,
                                     [(k[offset:offset + s.length], v[offset:offset + s.length]) for k, v in kv])
                elif s.start > 0:
                    self.store.free(s.seq)  # its last chunk ran: nothing reads this state again
                offset += s.length
            if self.stage.has_head:
                self.evaluation.add(self.model.token_losses(hidden, cb.labels_T), cb.labels_T, cb.position_ids_T)
            else:
                self._outbox[c] = hidden
        self.stats.tokens += cb.num_tokens
        self.stats.chunks += 1
        self._on_device.pop(c, None)

    def _empty(self, c: int) -> bool:
        # Padding micro-step of a data-parallel rank: no work, no messages.
        return self.batch.chunks[c].num_tokens == 0

    # ---- actions -----------------------------------------------------------------------------
    def recv_act(self, c: int) -> None:
        self._inbox[c] = self.transport.recv(ACT, c, self._hidden_shape(c), self.act_dtype, self.device)

    def forward(self, c: int, keep: bool) -> None:
        if self._empty(c):
            return
        if self.evaluation is not None:
            if keep:
                raise ValueError(f"forward of chunk {c} keeps activations in a forward-only (evaluation) step")
            self._run_eval(c)
            return
        live = self._run_forward(c, grad=keep, recompute=False)
        if keep:
            self._live[c] = live
        self._count_live()

    def _count_live(self) -> None:
        self.stats.max_live_activations = max(self.stats.max_live_activations, self.live_chunks)

    def send_act(self, c: int) -> None:
        self.transport.send(ACT, c, self._outbox.pop(c))

    def recompute(self, c: int) -> None:
        if self._empty(c):
            return
        self._live[c] = self._run_forward(c, grad=True, recompute=True)
        self.stats.recomputed_chunks += 1
        self._count_live()

    def recv_grad(self, c: int) -> None:
        self._grad_in[c] = self.transport.recv(GRAD, c, self._hidden_shape(c), self.act_dtype, self.device)

    def backward(self, c: int, split: bool = False) -> None:
        if self._empty(c):
            return
        live = self._live.pop(c)
        cb = self._chunk(c)
        outputs, grads = [], []
        if self.stage.has_head:
            if live.out.requires_grad:
                outputs.append(live.out)
                grads.append(torch.ones_like(live.out))
        else:
            outputs.append(live.out)
            grads.append(self._grad_in.pop(c))
        offset = 0
        for s in cb.segments:
            if self._continues(s):
                for layer, (k, v) in zip(self.layer_names, live.kv, strict=True):
                    g = self.store.grad(s.seq, layer, s.start, s.end)
                    if g is not None:
                        outputs += [k[offset:offset + s.length], v[offset:offset + s.length]]
                        grads += [g[0], g[1]]
            offset += s.length
        # Frozen paths (LoRA: layer 0's keys when k_proj is not adapted) carry no graph: no parameter they depend
        # on trains, so their gradients are dropped, not an error.
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        stash = WeightGradStash() if split else None
        if pairs:  # prefix gradients reach the store through hooks (or a mover)
            with capture(stash) if stash is not None else nullcontext():
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if stash is not None:
            self._awaiting_w[c] = stash  # the chunk keeps its slot until weight(c)
        if not self.stage.takes_ids:
            g_in = live.inp.grad
            self._grad_out[c] = g_in if g_in is not None else torch.zeros_like(live.inp)
        # The chunk holding a sequence's first piece is the last of that sequence to run backward.
        for s in cb.segments:
            if s.start == 0:
                self.store.free(s.seq)
        if self.stage.has_head:
            self.stats.loss_sum += float(live.out.detach()) / self.scale
        self.stats.tokens += cb.num_tokens
        self.stats.chunks += 1
        self._on_device.pop(c, None)

    def weight(self, c: int) -> None:
        """The parameter-gradient half of chunk ``c``'s split backward: add its stashed weight gradients."""
        if self._empty(c):
            return
        stash = self._awaiting_w.pop(c, None)
        if stash is None:
            raise RuntimeError(f"stage {self.stage}: weight action of chunk {c} without a pending split backward "
                               f"of it (none ran, or its weight action already did): the plan is out of order")
        stash.flush()

    def send_grad(self, c: int) -> None:
        self.transport.send(GRAD, c, self._grad_out.pop(c))

    # ---- plans -------------------------------------------------------------------------------
    def run(self, actions: Sequence) -> StepStats:
        """Run actions in order. Each has ``op`` (an enum whose value names a method above, e.g.
        ``"forward"``), ``chunk``, for forwards ``keep`` and for backwards ``split``."""
        actions = list(actions)
        if (any(getattr(a, "split", False) for a in actions) and self.evaluation is None
                and not has_split_linear(self.model)):
            raise ValueError("the step plan splits backward (parallel.split_backward=true) but the model has no "
                             "SplitLinear layers: apply chunkflow_pl.model.split_linear.apply_split_linear to it "
                             "first (the strategy does when parallel.split_backward=true)")
        for a in actions:
            self.act(a)
        return self.finish()

    def act(self, a) -> None:
        """Run one action (``run`` is ``act`` over a list, then ``finish``; with virtual stages the runner
        interleaves the actions of a rank's block executors this way)."""
        if self.should_stop is not None and self.should_stop():
            # the caller names the step (its optimizer-step count; batch.step_index counts global batches from 0)
            raise StepInterrupted(f"stopped before action {a}")
        op = a.op.value
        if self.evaluation is not None and op not in _EVAL_ACTIONS:
            raise ValueError(f"action {a} in a forward-only (evaluation) step")
        start = self.clock() if self.clock is not None else 0.0
        if op == "forward":
            self.forward(a.chunk, a.keep)
        elif op == "backward":
            split = bool(getattr(a, "split", False))
            self.backward(a.chunk, split)
            if not split and self.after_backward is not None:
                self.after_backward()
        elif op == "weight":  # the gradient of a split chunk is complete only now
            self.weight(a.chunk)
            if self.after_backward is not None:
                self.after_backward()
        elif op in _ACTIONS:
            getattr(self, op)(a.chunk)
        else:
            raise ValueError(f"unknown action {a}")
        if self.clock is not None:
            self.events.append((op, a.chunk, start, self.clock()))
        self.stats.peak_state_bytes = max(self.stats.peak_state_bytes, self.store.peak_bytes)

    @property
    def live_chunks(self) -> int:
        """Chunks holding activation slots now (``PipelinePlan.caps``): kept forwards and recomputes not yet through
        backward, and split chunks until their weight action (their stash lives until then)."""
        return len(self._live) + len(self._awaiting_w)

    def finish(self) -> StepStats:
        """End of the step: wait for the sends, check the plan left nothing behind; the step's stats."""
        self.transport.flush()
        self.store.drain()
        if len(self.store) or self._live or self._outbox or self._grad_out or self._awaiting_w:
            raise RuntimeError(f"step plan left state for {len(self.store)} sequences, live chunks "
                               f"{sorted(self._live)}, chunks awaiting their weight action {sorted(self._awaiting_w)} "
                               f"or unsent messages: the plan is incomplete")
        return self.stats


_EVAL_ACTIONS = {"forward", "recv_act", "send_act"}
_ACTIONS = {"recompute", "recv_act", "send_act", "recv_grad", "send_grad"}


class StepInterrupted(RuntimeError):
    """A step abandoned at a chunk boundary (``should_stop``); its partial gradients are to be discarded."""
