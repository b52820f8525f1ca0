"""NaN / inf never trains on silently and is never saved: the run stops (or skips the step, when asked)."""

from __future__ import annotations

import subprocess
import sys

import lightning as L
import pytest
import torch
from checkpoint_files import checkpoint_meta, checkpoint_weights, digest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from chunkflow_pl.training.nonfinite import NonFiniteError
from train import train

TINY = ["model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
        "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "data.num_sequences=40",
        "data.max_len=200", "data.global_batch_size=4", "chunk.size=64", "trainer.accelerator=cpu"]


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={out}", "logger=none", "callbacks.progress=null",
                                           "callbacks.checkpoint.every_n_train_steps=1", *TINY, *overrides])


def _ckpt_state(path):
    return checkpoint_meta(path)["global_step"], checkpoint_weights(path)


def test_diverging_run_exits_1_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e30: step 1 is finite (weights ~1e29), step 2's loss overflows to NaN."""
    out, export = tmp_path / "run", tmp_path / "export"
    r = subprocess.run([sys.executable, "train.py", "optim=sgd", "optim.lr=1e30", "trainer.max_steps=4",
                        "logger=none", "callbacks.progress=null", "callbacks.checkpoint.every_n_train_steps=1",
                        f"export.hf_dir={export}", f"hydra.run.dir={out}", *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "step 2: loss=nan" in r.stderr and "optim.on_nonfinite=skip" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    step, state = _ckpt_state(out / "checkpoints" / "last.ckpt")
    assert step == 1  # the checkpoint of the last good step, not overwritten by the NaN step
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (export / "model.safetensors").exists()


class _PoisonStep(L.Callback):
    """Makes the forward of one global batch produce NaN (as an overflow on one bad batch would)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx, self.handle = batch_idx, None
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[batch_idx] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.steps.append(trainer.global_step)
        if batch_idx == self.batch_idx:
            self.handle = pl_module.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_error_mode_stops_before_the_optimizer_step(tmp_path):
    poison = _PoisonStep(batch_idx=2)
    with pytest.raises(NonFiniteError, match=r"step 3: loss=nan .* weights and every checkpoint written are those "
                                             r"of step 2"):
        train(_cfg(tmp_path, "trainer.max_steps=5"), callbacks=[poison])
    step, state = _ckpt_state(tmp_path / "checkpoints" / "last.ckpt")
    assert step == 2
    for k, w in poison.weights[2].items():  # what step 3 started from is what the last checkpoint holds
        assert torch.equal(state[f"model.{k}"], w), k


def test_skip_mode_drops_the_step_counts_it_and_trains_on(tmp_path, caplog):
    poison = _PoisonStep(batch_idx=2)
    with caplog.at_level("WARNING"):
        out = train(_cfg(tmp_path, "trainer.max_steps=4", "optim.on_nonfinite=skip"), callbacks=[poison])
    module = out["module"]
    assert module.skipped_steps == 1 and out["trainer"].global_step == 4
    assert poison.steps == [0, 1, 2, 2, 3]  # batch 2 was skipped: 5 batches for 4 optimizer steps
    for k, w in poison.weights[2].items():  # the skipped batch left the weights untouched
        assert torch.equal(poison.weights[3][k], w), k
    assert not torch.equal(poison.weights[4]["embed.weight"], poison.weights[3]["embed.weight"])
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert "step 3: loss=nan" in caplog.text and "skipped it (optim.on_nonfinite=skip): 1 skipped so far" in caplog.text
    assert out["trainer"].callback_metrics["train/skipped_steps"] == 1


def test_skip_mode_gives_up_when_every_step_is_non_finite(tmp_path):
    with pytest.raises(NonFiniteError, match=r"3 steps in a row were non-finite \(optim.max_consecutive_skips=3\)"):
        train(_cfg(tmp_path, "trainer.max_steps=20", "optim.on_nonfinite=skip", "optim.max_consecutive_skips=3",
                   "model.init_std=1e30"))


def test_checkpoint_and_export_refuse_non_finite_weights(tmp_path):
    out = train(_cfg(tmp_path, "trainer.max_steps=1", f"export.hf_dir={tmp_path / 'export'}"))
    trainer, module = out["trainer"], out["module"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = digest(last)
    exported = (tmp_path / "export" / "model.safetensors").read_bytes()
    with torch.no_grad():
        module.model.layers["0"].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint .*layers\.0\.mlp\.up_proj\.weight"):
        trainer.save_checkpoint(last)
    assert digest(last) == before
    export_cb = next(cb for cb in trainer.callbacks if type(cb).__name__ == "HFExport")
    with pytest.raises(NonFiniteError, match="refusing to write the Hugging Face export"):
        export_cb.on_fit_end(trainer, module)
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == exported
