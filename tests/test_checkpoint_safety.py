"""Resuming never runs code stored in a checkpoint: loading is explicitly ``weights_only=True``, not
left to torch's default (which was ``False`` before torch 2.6, the oldest torch pyproject allows)."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from train import train

TINY = ["model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
        "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "data.num_sequences=16",
        "data.max_len=64", "data.global_batch_size=4", "trainer.accelerator=cpu", "logger=none",
        "callbacks.progress=null", "callbacks.checkpoint=null"]


class _Payload:
    """Unpickling this calls open(marker, "w"): code a checkpoint must never get to run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _cfg(out, *extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={out}", *TINY, *extra])


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, monkeypatch):
    out = train(_cfg(tmp_path / "a", "trainer.max_steps=1"))
    good = tmp_path / "good.ckpt"
    out["trainer"].save_checkpoint(good)
    ckpt = torch.load(good, weights_only=True)
    marker = tmp_path / "code-ran"
    ckpt["extra"] = _Payload(str(marker))
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    # torch < 2.6 defaulted to weights_only=False; this makes torch 2.6+ default to it too, so only an
    # explicit weights_only=True at the load call keeps the payload from running
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match=rf"ckpt_path={evil}: cannot be loaded .*weights_only=True"):
        train(_cfg(tmp_path / "b", "trainer.max_steps=2", f"ckpt_path={evil}"))
    assert not marker.exists()
    resumed = train(_cfg(tmp_path / "c", "trainer.max_steps=2", f"ckpt_path={good}"))  # a real one still loads
    assert resumed["trainer"].global_step == 2
