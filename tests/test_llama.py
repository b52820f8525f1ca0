"""Llama 3.x checkpoints: the decoder without q/k/v biases and with llama3 RoPE scaling, exact against
transformers' ``LlamaForCausalLM`` (tiny random config, float64, no download), presets sized as transformers
counts them, exports that transformers loads back, and architectures the decoder lacks refused at start."""

from __future__ import annotations

import json
import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_chunk_exactness import assert_same, chunked_grads

from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, save_hf, to_hf_name
from chunkflow_pl.model.rope import inv_freq

# Positions beyond the (tiny) pre-training context of 32 exercise all three frequency bands: with
# head_dim 16 and theta 500K the wavelengths run from 6 to ~3e5 tokens, across original / high = 8 and
# original / low = 32.
SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}
LENS = [5, 90, 13, 1, 200, 33]


def llama_config(**kw):
    from transformers import LlamaConfig

    args = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                tie_word_embeddings=False, rope_scaling=dict(SCALING), attn_implementation="sdpa")
    args.update(kw)
    return LlamaConfig(**args)


def widen_llama(hf) -> None:
    """float64 reference: transformers' RMSNorm and RoPE compute in float32 whatever the model dtype; run the
    norm in the input dtype and take float64 cos/sin of its own float32 angles (as ``conftest.widen_hf_precision``
    does for Qwen2)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    def norm_forward(self, x):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h

    def rope_forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1).to(torch.float64)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    for m in hf.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(norm_forward, m)
        elif isinstance(m, LlamaRotaryEmbedding):
            m.forward = types.MethodType(rope_forward, m)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(llama_config()).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.2) if "norm" not in name else p.uniform_(0.5, 1.5)
    hf.save_pretrained(d)
    widen_llama(hf)
    cfg = ModelConfig.from_hf_dir(d)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(model, d, cfg)
    return hf, model, cfg, d


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 500000.0, {**SCALING, "original_max_position_embeddings": 8192}),  # Llama 3.1 8B/70B
    (16, 500000.0, SCALING),
    (64, 10000.0, {**SCALING, "factor": 32.0, "high_freq_factor": 2.0}),
])
def test_llama3_inverse_frequencies_are_transformers_bit_for_bit(head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    heads = 4
    hf_cfg = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, rope_theta=theta,
                         rope_scaling=dict(scaling))
    want = LlamaRotaryEmbedding(hf_cfg).inv_freq
    cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    from chunkflow_pl.model.rope import Llama3Scaling

    got = inv_freq(head_dim, theta, Llama3Scaling(cfg.rope_factor, cfg.rope_low_freq_factor,
                                                  cfg.rope_high_freq_factor, cfg.rope_original_max_positions))
    assert torch.equal(got, want)
    assert not torch.equal(inv_freq(head_dim, theta), want)  # the scaling matters for these settings


def test_config_json_reads_as_llama_without_biases(llama):
    _, model, cfg, _ = llama
    assert (cfg.architecture, cfg.qkv_bias, cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_positions) == (
        "llama", False, "llama3", 8.0, 32)
    assert not any(n.endswith("proj.bias") for n, _ in model.named_parameters())


def test_logits_equal_transformers_in_float64(llama):
    hf, model, cfg, _ = llama
    from chunkflow_pl.model.attention import VarlenMeta

    ids = torch.randint(0, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(1))
    want = hf(ids[None]).logits[0]
    h, _ = model(ids, torch.arange(300), VarlenMeta.from_lengths([300], [0]))
    got = model.logits(h)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size,k", [(16, 1), (64, 2)])
def test_chunked_gradient_equals_transformers_whole_sequences(llama, chunk_size, k):
    """Sequences up to 200 tokens, 6x the 32-token original context: every RoPE band is in play; chains of
    chunks pass state (prefix attention with scaled positions) and are recomputed."""
    hf, model, cfg, _ = llama
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    ref = {n: hf.get_parameter(to_hf_name(n)).grad.clone() for n, _ in model.named_parameters()}
    got, stats = chunked_grads(model, seqs, targets, n_label, chunk_size, k=k)
    assert_same(got, ref, rtol=1e-8)
    assert stats.loss_sum == pytest.approx(total.item(), rel=1e-12)


def test_export_is_a_llama_checkpoint_transformers_loads_with_the_same_logits(llama, tmp_path):
    from transformers import LlamaForCausalLM

    hf, model, cfg, _ = llama
    save_hf(model, cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64, attn_implementation="sdpa")
    widen_llama(back)
    ids = torch.randint(0, cfg.vocab_size, (120,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(back(ids[None]).logits, hf(ids[None]).logits, rtol=0, atol=0)
    assert replace(ModelConfig.from_hf_dir(tmp_path / "out"), name="") == replace(cfg, name="")  # round trip


@pytest.mark.parametrize("change,message", [
    ({"model_type": "qwen3"}, "q/k RMSNorm"),
    ({"model_type": "mixtral"}, "mixture-of-experts"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"model_type": "llama", "head_dim": 32}, "head_dim=32"),
    ({"model_type": "gpt_neox"}, "not supported"),
])
def test_architectures_the_decoder_lacks_are_refused_naming_what_is_missing(change, message):
    base = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**base, **change}, name="ckpt")
