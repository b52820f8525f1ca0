"""SIGTERM / SIGUSR1 stop a run at the next chunk boundary with a resumable checkpoint and a non-zero exit;
the resumed run reproduces the uninterrupted one bit for bit (losses and final weights).

The interrupted runs are separate processes that receive a real signal: ``driver.py`` (written below)
is ``train.py``'s Hydra entry point plus two callbacks, one logging each step's loss exactly, one sending
the signal to its own process at a chosen point (inside the forward of a chunk, or between steps).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from train import train

COMMON = ["model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
          "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "trainer.precision=64-true",
          "trainer.accelerator=cpu", "data.num_sequences=40", "data.min_len=100", "data.max_len=200",
          "data.global_batch_size=4", "chunk.size=64", "chunk.k=1", "trainer.max_steps=4", "optim.warmup_steps=2",
          "logger=none", "callbacks.progress=null", "callbacks.checkpoint=null"]


class LossLog(L.Callback):
    """Appends ``<step> <loss as float.hex>`` per optimizer step to ``path`` (flushed: survives a kill)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = pl_module.last_stats.global_loss_sum / batch.num_label_tokens
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(loss).hex()}\n")


class SignalSelf(L.Callback):
    """Sends ``sig`` to this process: ``mid`` = during the 3rd forward of layer 0 inside step ``step``,
    ``between`` = once step ``step`` has completed (before the next one starts), ``start`` = now (the callback
    is built during start-up, before the Trainer exists)."""

    def __init__(self, sig: str, step: int, where: str) -> None:
        self.sig, self.step, self.where = getattr(signal, sig), step, where
        if where == "start":
            os.kill(os.getpid(), self.sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "mid" and trainer.global_step + 1 == self.step:
            calls = []

            def hook(module, args, out):
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), self.sig)

            pl_module.model.layers["0"].register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "between" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


DRIVER = textwrap.dedent(f"""
    import os, sys
    sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
    import hydra
    import train
    from test_preemption import LossLog, SignalSelf

    @hydra.main(version_base="1.3", config_path={str(ROOT / 'conf')!r}, config_name="train")
    def main(cfg):
        cbs = [LossLog(os.environ["LOSS_LOG"])]
        if os.environ.get("SIGNAL_SELF"):
            sig, step, where = os.environ["SIGNAL_SELF"].split(":")
            cbs.append(SignalSelf(sig, int(step), where))
        sys.exit(train.run(cfg, callbacks=cbs))

    main()
""")


def _drive(tmp_path: Path, log: Path, *overrides: str, env: dict[str, str] | None = None):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # the thread count of this process, whose in-process runs the subprocess's halves are compared with bit for bit
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "LOSS_LOG": str(log), **(env or {})}
    return subprocess.run([sys.executable, str(driver), *COMMON, *overrides], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _train(out: Path, log: Path, *overrides: str) -> None:
    """A run in this process (the resumed halves: bit-identity across processes is part of the claim)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, f"output_dir={out}", *overrides])
    train(cfg, callbacks=[LossLog(str(log))])


def _losses(path: Path) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in (line.split() for line in path.read_text().splitlines())]


def _export(path: Path) -> bytes:
    return (path / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: 4 steps, AdamW with warmup + cosine, float64, split sequences (chunk.size=64)."""
    d = tmp_path_factory.mktemp("reference")
    _train(d, d / "losses", f"export.hf_dir={d / 'hf'}")
    losses = _losses(d / "losses")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    return losses, _export(d / "hf")


def test_sigterm_inside_a_step_saves_and_the_resumed_run_is_bit_identical(tmp_path, reference):
    ref_losses, ref_weights = reference
    run = tmp_path / "run"
    r = _drive(tmp_path, tmp_path / "losses", f"hydra.run.dir={run}", env={"SIGNAL_SELF": "SIGTERM:3:mid"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    assert "stopped on SIGTERM (inside step 3, stopped before action" in r.stderr, r.stderr[-3000:]
    ckpt = run / "hpc_ckpt_1.ckpt"
    assert ckpt.is_dir() and f"resume with ckpt_path={ckpt}" in r.stderr  # a DCP checkpoint directory
    assert _losses(tmp_path / "losses") == ref_losses[:2]  # step 3 was abandoned, not logged

    # resume in a new folder: step 3 (the interrupted global batch) is redone, then step 4
    _train(tmp_path / "resumed", tmp_path / "losses", f"ckpt_path={ckpt}", f"export.hf_dir={tmp_path / 'hf'}")
    assert _losses(tmp_path / "losses") == ref_losses
    assert _export(tmp_path / "hf") == ref_weights


def test_sigterm_during_start_up_stops_before_step_1_with_a_checkpoint_and_resumes_exactly(tmp_path, reference):
    """Found by benchmarks/faults.py: a signal before the pre-emption callback's setup took the default action
    (exit -15, no checkpoint, peers left waiting). Now it is held until the callback takes over."""
    from checkpoint_files import checkpoint_meta

    ref_losses, ref_weights = reference
    run = tmp_path / "run"
    r = _drive(tmp_path, tmp_path / "losses", f"hydra.run.dir={run}", env={"SIGNAL_SELF": "SIGTERM:0:start"})
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "SIGTERM received during start-up" in out and "stopped on SIGTERM (before step 1)" in out, out[-3000:]
    ckpt = run / "hpc_ckpt_1.ckpt"
    assert checkpoint_meta(ckpt)["global_step"] == 0
    assert not (tmp_path / "losses").exists()  # no step ran

    _train(tmp_path / "resumed", tmp_path / "losses", f"ckpt_path={ckpt}", f"export.hf_dir={tmp_path / 'hf'}")
    assert _losses(tmp_path / "losses") == ref_losses
    assert _export(tmp_path / "hf") == ref_weights


def test_signals_are_held_only_until_training_ends():
    """Held from start-up to the pre-emption callback; once it restores its handlers a signal takes its default
    action again (else a script that built a strategy would swallow SIGTERM for good)."""
    from chunkflow_pl.strategy.preemption import Preemption
    from chunkflow_pl.utils.held_signals import hold_signals

    hold_signals()
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    stop = Preemption()
    stop._install()
    stop._restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_sigusr1_on_slurm_requeues_and_the_requeued_job_resumes_by_itself(tmp_path, reference, monkeypatch):
    ref_losses, ref_weights = reference
    bin_dir = tmp_path / "bin"  # SLURM is not installed here: a stand-in scontrol records how it was called
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = _drive(tmp_path, tmp_path / "losses", env={**slurm, "SIGNAL_SELF": "SIGUSR1:2:between"})
    assert r.returncode == 128 + signal.SIGUSR1, r.stderr[-3000:]
    assert "stopped on SIGUSR1 (before step 3)" in r.stderr, r.stderr[-3000:]
    run = tmp_path / "outputs" / "slurm-4242"  # named after the job: the requeued job finds it
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]  # Lightning's own handler did not save
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert _losses(tmp_path / "losses") == ref_losses[:2]

    # SLURM starts the job again with the same id, so the same folder: it resumes from the checkpoint in it
    for k, v in {**slurm, "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(k, v)
    _train(run, tmp_path / "losses", f"export.hf_dir={tmp_path / 'hf'}")
    assert _losses(tmp_path / "losses") == ref_losses
    assert _export(tmp_path / "hf") == ref_weights
    assert not list(run.glob("hpc_ckpt_*"))  # spent once the run completed


def _csv_losses(run: Path) -> list[tuple[str, str]]:
    """(step, train/loss) of every CSV row holding a loss, over the logger's versions in order (version_1: the
    resumed half)."""
    rows = []
    for f in sorted(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        rows += [(r["step"], r["train/loss"]) for r in csv.DictReader(f.open()) if r.get("train/loss")]
    return rows


@pytest.fixture(scope="module")
def csv_reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("csv_reference")
    _train(d, d / "losses", "logger=csv", "trainer.log_every_n_steps=1")
    rows = _csv_losses(d)
    assert len(rows) == 4
    return rows


@pytest.mark.parametrize("when", ["SIGTERM:3:mid", "SIGTERM:1:mid", "SIGUSR1:2:between"])
def test_a_run_resumed_from_a_preemption_checkpoint_logs_the_uninterrupted_runs_steps(tmp_path, csv_reference, when):
    """The CSV of a pre-empted run and its resumption (auto-resume in the same folder) equals the uninterrupted
    run's, step by step: no step logged twice, none missing, none shifted (Lightning's loop adds one to the logger
    step when it restores a checkpoint saved in the middle of a batch), the same losses (inside step 1: an
    optimizer saved before its first step resumes as one that never stepped)."""
    run = tmp_path / "run"
    r = _drive(tmp_path, tmp_path / "losses", f"hydra.run.dir={run}", "logger=csv", "trainer.log_every_n_steps=1",
               env={"SIGNAL_SELF": when})
    sig, step, where = when.split(":")
    assert r.returncode == 128 + getattr(signal, sig), r.stderr[-3000:]
    # one step number in the message: the optimizer step that was abandoned, or the one not begun
    detail = rf"inside step {step}, stopped before action \S+" if where == "mid" else rf"before step {int(step) + 1}"
    assert re.search(rf"stopped on {sig} \({detail}\); saved ", r.stderr), r.stderr[-3000:]
    _train(run, tmp_path / "losses", "logger=csv", "trainer.log_every_n_steps=1")
    assert _csv_losses(run) == csv_reference
