"""Memory invariant: a chunk's saved activations do not grow with the sequence, only its prefix state does."""

from __future__ import annotations

import torch

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.schedule.executor import ChunkExecutor

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
C = 128


def last_chunk_saved_bytes(seq_len: int) -> tuple[int, int]:
    """Saved-tensor bytes of the last chunk's forward of one sequence, and its state bytes."""
    torch.manual_seed(0)
    model = Qwen2Decoder(CFG, loss_chunk=64)
    ids = torch.randint(0, 64, (seq_len,))
    plan = build_chunk_plan([seq_len], C)
    batch = assemble_step(plan.chunks, [ids], [targets_from_labels(ids)], [seq_len], [0], seq_len - 1, 0,
                          len(plan.chunks))
    ex = ChunkExecutor(model, batch, torch.device("cpu"))
    *first, last = range(len(batch.chunks))
    for c in first:
        ex.forward(c, keep=False)  # no activations kept: only keys/values go to the state store
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ex.forward(last, keep=True)
    return sum(seen.values()), ex.store.nbytes()


def test_saved_activations_grow_only_by_the_prefix_state():
    short, state_short = last_chunk_saved_bytes(4 * C)
    long, state_long = last_chunk_saved_bytes(16 * C)
    kv_bytes_per_token = CFG.num_layers * 2 * CFG.num_kv_heads * CFG.head_dim * 4
    # The only difference: the last chunk attends to a 15C-token prefix instead of a 3C one.
    assert long - short == kv_bytes_per_token * (15 * C - 3 * C)
    assert state_long - state_short == kv_bytes_per_token * (15 * C - 3 * C)
    # and what is not prefix is O(chunk): well under one chunk x sequence score matrix per head
    assert short - kv_bytes_per_token * 3 * C < C * 16 * C * CFG.num_heads * 4
