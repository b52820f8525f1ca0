"""Resuming never runs code stored in a checkpoint: its Lightning part is read with an explicit
``weights_only=True`` (not torch's default, which was ``False`` before torch 2.6, the oldest torch
pyproject allows), and DCP's ``.metadata``, a plain pickle, is checked before DCP unpickles it."""

from __future__ import annotations

import builtins
import pickle
import shutil

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
    marker = tmp_path / "code-ran"

    in_meta = tmp_path / "meta.ckpt"  # the Lightning part (loops, data position, ...)
    shutil.copytree(good, in_meta)
    meta = torch.load(good / "meta.pt", weights_only=True)
    torch.save({**meta, "extra": _Payload(str(marker))}, in_meta / "meta.pt")
    in_index = tmp_path / "index.ckpt"  # DCP's tensor index
    shutil.copytree(good, in_index)
    index = pickle.loads((good / ".metadata").read_bytes())
    (in_index / ".metadata").write_bytes(pickle.dumps((_Payload(str(marker)), index)))

    # torch < 2.6 defaulted to weights_only=False; this makes torch 2.6+ default to it too, so only an
    # explicit weights_only=True at the load call keeps the payload from running
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for evil in (in_meta, in_index):
        with pytest.raises(ValueError, match=rf"ckpt_path={evil}"):
            train(_cfg(tmp_path / evil.stem, "trainer.max_steps=2", f"ckpt_path={evil}"))
        assert not marker.exists(), evil.name
    resumed = train(_cfg(tmp_path / "c", "trainer.max_steps=2", f"ckpt_path={good}"))  # a real one still loads
    assert resumed["trainer"].global_step == 2
