from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meta_device import parameters_on_meta

from chunkflow_pl.model.config import PRESETS, get_preset
from chunkflow_pl.model.loss import chunked_cross_entropy
from chunkflow_pl.utils.sizes import parse_size


@pytest.mark.parametrize("slice_tokens", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_plain(slice_tokens):
    torch.manual_seed(0)
    h = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (64,))
    y[::5] = -100
    ref = F.cross_entropy(h @ w.T, y, ignore_index=-100, reduction="sum")
    got = chunked_cross_entropy(h, w, y, slice_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_ref = torch.autograd.grad(ref, [h, w])
    g_got = torch.autograd.grad(got, [h, w])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_cross_entropy_never_holds_full_logits():
    """Saved tensors of the sliced loss hold no [T, V] logits, only the hidden slices."""
    h = torch.randn(512, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    y = torch.randint(0, 1000, (512,))
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(h, w, y, 64)
    assert biggest < 512 * 1000 / 4


@pytest.mark.parametrize("s,n", [("32k", 32768), ("256K", 262144), ("1m", 1048576), (4096, 4096), ("77", 77)])
def test_parse_size(s, n):
    assert parse_size(s) == n


@pytest.mark.parametrize("bad", ["32kb", "k", "-4", "1.5k", "", 0, True])
def test_parse_size_rejects_with_key_and_forms(bad):
    with pytest.raises(ValueError, match=r"chunk\.size=.*32k, 256K, 1m"):
        parse_size(bad, key="chunk.size")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_transformers_exactly(name):
    """Every preset builds the parameters (names via NAME_MAP, shapes, total count) of transformers'
    Qwen2ForCausalLM (LlamaForCausalLM for Llama presets) for the same config.json, built on the meta device
    (no memory, no download)."""
    import transformers

    from chunkflow_pl.model.decoder import Qwen2Decoder
    from chunkflow_pl.model.hf_io import to_hf_name

    cfg = PRESETS[name]
    arch = cfg.to_hf_dict()["architectures"][0]
    config_cls, model_cls = getattr(transformers, arch.replace("ForCausalLM", "Config")), getattr(transformers, arch)
    hf_cfg = config_cls(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        hf = model_cls(hf_cfg)
    with parameters_on_meta():
        ours = Qwen2Decoder(cfg)
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}  # a tied lm_head is listed once
    assert {to_hf_name(n): tuple(p.shape) for n, p in ours.named_parameters()} == hf_shapes
    assert cfg.num_params() == sum(p.numel() for p in hf.parameters())


# Parameters of the published checkpoints: metadata.total_size of each model.safetensors.index.json (bf16 bytes)
# / 2, e.g. https://huggingface.co/Qwen/Qwen2.5-32B/raw/main/model.safetensors.index.json = 65527752704. The
# model cards round (32B: "32.5B"); the checkpoints are exact. 0.5B / 1.5B ship one file without an index:
# their cards' rounded sizes (0.49B, 1.54B).
PUBLISHED_EXACT = {"qwen3b": 6171877376 // 2, "qwen7b": 15231233024 // 2, "qwen14b": 29540067328 // 2,
                   "qwen32b": 65527752704 // 2, "qwen72b": 145412407296 // 2,
                   # meta-llama/Llama-3.1-8B and -70B: 16060522496 and 141107412992 bf16 bytes
                   "llama3.1-8b": 16060522496 // 2, "llama3.1-70b": 141107412992 // 2}
PUBLISHED_ROUNDED = {"qwen0.5b": 0.49, "qwen1.5b": 1.54}


def test_presets_have_the_published_checkpoints_sizes():
    for name, n in PUBLISHED_EXACT.items():
        assert PRESETS[name].num_params() == n, name
    for name, billions in PUBLISHED_ROUNDED.items():
        assert round(PRESETS[name].num_params() / 1e9, 2) == billions, name


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="model='qwen9b' is unknown; choose one of .*qwen7b"):
        get_preset("qwen9b")
