"""Live exactness check: one split sequence's gradient, chunked as in training versus unchunked.

``probe_sequence`` takes sequence ``s`` of a ``StepBatch`` (its pieces may sit in different chunks,
packed with other sequences), rebuilds its tokens and whole-sequence targets from those pieces, and
computes the gradient of its loss (summed token cross-entropy / its supervised tokens) twice with the
current weights::

    chunked:    one chunk per piece, cut where training cut it, run by the training step's path: a
                one-stage StepRunner (same scheduler, same k, same state offload)
    unchunked:  the whole sequence in one forward and one backward

and returns the relative L2 difference over all parameters. The training step's gradients are not
touched: every parameter's ``.grad`` is set aside before and put back after (no copy). Memory: two
extra gradient sets and the activations of the whole sequence, which is why the caller bounds its
length. Everything is rank-local: no collective is called, so with data parallelism each rank checks a
sequence of its own share on its own replica.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.types import IGNORE_INDEX, Segment, StepBatch
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.schedule.runner import StepRunner


@dataclass(frozen=True)
class ProbeResult:
    seq: int
    length: int
    pieces: int
    rel_diff: float  # ||g_chunked - g_whole|| / ||g_whole||
    max_abs_diff: float
    grad_norm: float  # ||g_whole||


def split_sequences(batch: StepBatch) -> dict[int, int]:
    """Sequences of ``batch`` cut into several pieces: ``{seq: pieces}``."""
    pieces: dict[int, int] = {}
    for c in batch.chunks:
        for seg in c.segments:
            pieces[seg.seq] = pieces.get(seg.seq, 0) + 1
    return {s: n for s, n in pieces.items() if n > 1}


def pick_sequence(batch: StepBatch, max_tokens: int) -> int | None:
    """The split sequence of at most ``max_tokens`` tokens with the most pieces (then the longest, then the first)."""
    candidates = [(n, batch.seq_lens[s], -s) for s, n in split_sequences(batch).items()
                  if batch.seq_lens[s] <= max_tokens]
    return -max(candidates)[2] if candidates else None


def sequence_tensors(batch: StepBatch, seq: int) -> tuple[torch.Tensor, torch.Tensor, list[Segment]]:
    """Token ids and whole-sequence targets of ``seq`` (host tensors) and its pieces in order."""
    parts: list[tuple[Segment, torch.Tensor, torch.Tensor]] = []
    for c in batch.chunks:
        off = 0
        for seg in c.segments:
            if seg.seq == seq:
                parts.append((seg, c.input_ids_T[off : off + seg.length], c.labels_T[off : off + seg.length]))
            off += seg.length
    parts.sort(key=lambda p: p[0].start)
    pieces = [p[0] for p in parts]
    covered = [0] + [p.end for p in pieces]
    if not pieces or any(p.start != e for p, e in zip(pieces, covered)) or covered[-1] != batch.seq_lens[seq]:
        raise ValueError(f"sequence {seq}: pieces {pieces} do not tile [0, {batch.seq_lens[seq]}) on this rank")
    ids = torch.cat([p[1] for p in parts]).cpu()
    targets = torch.cat([p[2] for p in parts]).cpu()
    return ids, targets, pieces


def _grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    out = [p.grad for p in params]
    for p in params:
        p.grad = None
    return out


def probe_sequence(model: torch.nn.Module, batch: StepBatch, seq: int, device: torch.device, k: int,
                   offload_state: bool = False,
                   context: Callable[[], AbstractContextManager] | None = None) -> ProbeResult:
    """Chunked versus unchunked gradient of sequence ``seq`` of ``batch`` (see the module docstring).

    ``model`` is a whole ``Qwen2Decoder``; ``context`` wraps each computation (the precision plugin's
    autocast, so both run as training does).
    """
    if not (model.stage.takes_ids and model.stage.has_head):
        raise ValueError("the exactness probe needs the whole model on this rank (parallel.pp = 1)")
    ctx = context or nullcontext
    ids, targets, pieces = sequence_tensors(batch, seq)
    length = int(ids.numel())
    n_label = max(int((targets != IGNORE_INDEX).sum()), 1)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = _grads(params)  # the training step's gradients, set aside
    try:
        with ctx():
            hidden, _ = model(ids.to(device), torch.arange(length, device=device), VarlenMeta.from_lengths([length]))
            (model.loss_sum(hidden, targets.to(device)) / n_label).backward()
        whole = _grads(params)
        del hidden
        one = [[Segment(0, p.start, p.end)] for p in pieces]  # the training cuts, one piece per chunk
        probe = assemble_step(one, {0: ids}, {0: targets}, [length], [0], n_label, batch.step_index, len(one))
        with ctx():
            StepRunner(model.cfg, k, device, offload_state=offload_state).run(model, probe)
        chunked = _grads(params)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    diff2 = ref2 = 0.0
    max_abs = 0.0
    for p, gw, gc in zip(params, whole, chunked):
        gw = gw.double() if gw is not None else torch.zeros_like(p, dtype=torch.float64)
        gc = gc.double() if gc is not None else torch.zeros_like(p, dtype=torch.float64)
        d = gc - gw
        diff2 += float(d.pow(2).sum())
        ref2 += float(gw.pow(2).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    ref = ref2**0.5
    return ProbeResult(seq=seq, length=length, pieces=len(pieces), rel_diff=diff2**0.5 / max(ref, 1e-300),
                       max_abs_diff=max_abs, grad_norm=ref)
