"""Hugging Face checkpoint directories: read single-file and sharded, export that transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_hf_model

from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import NAME_MAP, from_hf_name, load_pretrained, save_hf, to_hf_name


def test_name_map_round_trips():
    for ours, hf in NAME_MAP:
        o, h = ours.replace("{i}", "3"), hf.replace("{i}", "3")
        assert to_hf_name(o) == h and from_hf_name(h) == o
    assert from_hf_name("model.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_checkpoint_loads_and_export_reloads_in_transformers(tmp_path, tie):
    from transformers import Qwen2ForCausalLM

    hf = make_hf_model(tie=tie, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "src", max_shard_size="20KB")  # forces model.safetensors.index.json
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    cfg = ModelConfig.from_hf_dir(tmp_path / "src")
    assert cfg.tie_word_embeddings == tie and cfg.num_kv_heads == 2
    m = Qwen2Decoder(cfg)
    load_pretrained(m, tmp_path / "src", cfg)
    ids = torch.randint(0, cfg.vocab_size, (17,))
    h, _ = m(ids, torch.arange(17), VarlenMeta.from_lengths([17]))
    torch.testing.assert_close(m.logits(h), hf(ids[None]).logits[0], rtol=1e-5, atol=1e-5)

    save_hf(m, cfg, tmp_path / "out")
    back = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    # The exported weights are the loaded ones, bit for bit: transformers gives identical logits from both.
    torch.testing.assert_close(back(ids[None]).logits[0], hf(ids[None]).logits[0], rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] == tie


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    hf = make_hf_model(dtype=torch.float32)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    wrong = ModelConfig(**{**cfg.as_dict(), "intermediate_size": 64})
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_pretrained(Qwen2Decoder(wrong), tmp_path, wrong)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_dir(tmp_path / "missing")


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_exported_files_have_the_permissions_of_their_neighbours(tmp_path, umask):
    """safetensors creates its file 0600; the export gives it the mode every other file there gets (the umask's)."""
    import os

    from chunkflow_pl.model.hf_io import save_hf_shard

    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    m = Qwen2Decoder(cfg)
    old = os.umask(umask)
    try:
        save_hf(m, cfg, tmp_path / "one")
        save_hf_shard(m, tmp_path / "shards", "model-00001-of-00002.safetensors")
        (tmp_path / "shards" / "neighbour.json").write_text("{}")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    modes = {p.name: p.stat().st_mode & 0o777 for d in ("one", "shards") for p in (tmp_path / d).iterdir()}
    assert modes == dict.fromkeys(modes, want) and "model.safetensors" in modes, {k: oct(v) for k, v in modes.items()}
