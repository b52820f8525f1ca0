"""Shared fixtures: tiny random Hugging Face Qwen2 references (no downloads)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # train.py and callbacks/ live at the repo root
    sys.path.insert(0, str(ROOT))


def tiny_hf_config(tie: bool = False, vocab: int = 97, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   hidden: int = 32, theta: float = 10000.0, max_positions: int = 4096):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                       rope_theta=theta, max_position_embeddings=max_positions, attn_implementation="sdpa")


def widen_hf_precision(hf_model) -> None:
    """Float64 reference: transformers computes two things in float32 whatever the model dtype, which caps
    a float64 comparison at ~1e-7. ``Qwen2RMSNorm`` (``hidden_states.to(torch.float32)``) and RoPE's
    ``emb.cos()/.sin()``. For float64 parity we widen exactly those: the norm runs in the input dtype, and
    cos/sin of transformers' own float32 angles are taken in float64 (chunkflow_pl does the same, see
    ``model/rope.py``). Every other op stays transformers' own. float32 parity uses the unmodified model."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding

    def norm_forward(self, x):
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)

    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1).to(torch.promote_types(x.dtype, torch.float32))
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for m in hf_model.modules():
        if isinstance(m, Qwen2RMSNorm):
            m.forward = types.MethodType(norm_forward, m)
        elif isinstance(m, Qwen2RotaryEmbedding):
            m.forward = types.MethodType(rope_forward, m)


def make_hf_model(tie: bool = False, dtype=torch.float64, seed: int = 0, std: float = 0.2, **kw):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(tiny_hf_config(tie=tie, **kw)).to(dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, std) if "norm" not in name else p.uniform_(0.5, 1.5)
    if dtype == torch.float64:
        widen_hf_precision(hf)
    return hf


@pytest.fixture
def hf_dir(tmp_path):
    """A saved tiny Qwen2ForCausalLM checkpoint directory (untied, GQA 2)."""
    hf = make_hf_model(tie=False, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def hf_reference_step(hf_dir: Path, seqs, labels):
    """transformers' gradient of sum(CE) / supervised tokens over whole sequences, and its weights."""
    import torch.nn.functional as F
    from transformers import Qwen2ForCausalLM

    from chunkflow_pl.data.labels import targets_from_labels

    hf = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="sdpa")
    widen_hf_precision(hf)
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    n = sum(int((t != -100).sum()) for t in targets)
    loss = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
               for s, t in zip(seqs, targets)) / n
    loss.backward()
    return {k: p.detach() for k, p in hf.named_parameters()}, {k: p.grad for k, p in hf.named_parameters()}


@pytest.fixture(autouse=True)
def _process_threads_unchanged():
    """A test must leave pytest's process with the thread count it found: bit-identity between an in-process run
    and a subprocess (tests/test_preemption.py) holds only at one thread count, and a leaked
    ``torch.set_num_threads(1)`` once made later tests compare 1-thread with 2-thread sums (failed in CI).
    The test that leaks fails, naming what it changed; the count is put back either way."""
    import os

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    now, now_omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    assert (now, now_omp) == (threads, omp), (
        f"this test left torch.get_num_threads()={now}, OMP_NUM_THREADS={now_omp!r} (found {threads}, {omp!r}): "
        "set them in spawned ranks only, or restore them")
