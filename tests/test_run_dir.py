"""One output folder per run: runs started together never share one; a folder is reused only to resume."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
import torch
import yaml
from checkpoint_files import checkpoint_weights, digest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from chunkflow_pl.utils.run_dir import OutputDirInUse, resume_policy, run_dir_name
from train import train

NOW = dt.datetime(2025, 1, 31, 14, 3, 27)
TINY = ["model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
        "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "data.num_sequences=16",
        "data.max_len=64", "data.global_batch_size=4", "trainer.accelerator=cpu", "trainer.max_steps=1",
        "logger=none", "callbacks.progress=null", "callbacks.checkpoint.every_n_train_steps=1"]


def test_run_dir_name_per_launcher():
    assert run_dir_name({}, NOW, "9f2c1ab0") == "2025-01-31/14-03-27-9f2c1ab0"
    assert run_dir_name({}, NOW, "aa") != run_dir_name({}, NOW, "bb")  # same second, different runs
    assert run_dir_name({"CHUNKFLOW_RUN_ID": "exp/1", "SLURM_JOB_ID": "5"}, NOW, "x") == "run-exp-1"
    slurm = {"SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "train"}
    assert run_dir_name(slurm, NOW, "x") == "slurm-123"
    assert run_dir_name({**slurm, "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}, NOW, "x") == "slurm-7_2"
    assert run_dir_name({**slurm, "SLURM_JOB_NAME": "bash"}, NOW, "x") == "2025-01-31/14-03-27-x"  # salloc shell
    assert run_dir_name({"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "4"}, NOW, "x") == "torchrun-abc"
    with pytest.raises(ValueError, match="WORLD_SIZE > 1 but nothing tells the ranks"):
        run_dir_name({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2"}, NOW, "x")


def test_resume_policy(tmp_path):
    assert resume_policy(tmp_path, None, {}) is None  # a new folder
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    with pytest.raises(OutputDirInUse, match=rf"{tmp_path} already holds checkpoints .*ckpt_path={last}"):
        resume_policy(tmp_path, None, {})
    assert resume_policy(tmp_path, "/some/other.ckpt", {}) == "/some/other.ckpt"
    assert resume_policy(tmp_path, None, {"SLURM_RESTART_COUNT": "1"}) == str(last)  # a requeued job
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    assert resume_policy(tmp_path, None, {}) == "hpc"  # a pre-empted run's folder resumes it


def test_a_restarted_job_resumes_a_checkpoint_whose_swap_a_kill_cut_short(tmp_path):
    """Found by benchmarks/faults.py: a kill between a save's two renames leaves only ``last.ckpt.old`` (whole);
    loading ``last.ckpt`` takes it, but the restarted job saw no ``last.ckpt`` and started over from step 0."""
    from chunkflow_pl.strategy.checkpoint import readable_checkpoint

    old = tmp_path / "checkpoints" / "last.ckpt.old"
    old.mkdir(parents=True)
    (old / ".metadata").write_bytes(b"x")
    (old / "meta.pt").write_bytes(b"x")
    restart = {"TORCHELASTIC_RESTART_COUNT": "1"}
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_policy(tmp_path, None, restart) == str(last)
    assert readable_checkpoint(last) == old  # what loading it reads
    (old / "meta.pt").unlink()  # cut off before its last part: nothing whole to resume
    (tmp_path / "checkpoints" / "last.ckpt.partial").mkdir()
    assert resume_policy(tmp_path, None, restart) is None


def test_reusing_a_folder_with_checkpoints_is_refused_unless_resuming(tmp_path):
    def cfg(*extra):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[f"output_dir={tmp_path}", *TINY, *extra])

    train(cfg())
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = digest(last)
    with pytest.raises(OutputDirInUse, match="already holds checkpoints of another run"):
        train(cfg("seed=7"))
    assert digest(last) == before
    out = train(cfg(f"ckpt_path={last}", "trainer.max_steps=2"))  # resuming it is fine
    assert out["trainer"].global_step == 2


def test_two_runs_started_together_keep_separate_folders(tmp_path):
    """The default hydra.run.dir: two concurrent `python train.py` in one working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"seed={seed}", *TINY], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 2, runs
    seeds, weights = set(), []
    for run in runs:
        seeds.add(yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"])
        weights.append(checkpoint_weights(run / "checkpoints" / "last.ckpt"))
    assert seeds == {1, 2}  # each folder records its own run's config
    assert not torch.equal(weights[0]["model.embed.weight"], weights[1]["model.embed.weight"])
