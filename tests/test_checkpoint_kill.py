"""A kill at any moment of a checkpoint save leaves the previous checkpoint whole, and resuming it is exact; a
damaged checkpoint folder is refused with one line that names it and what is wrong (issue 19 item 3).

The killed runs are separate processes (``driver.py``, written below: train.py's entry point plus a hook that
sends SIGKILL to its own process at a chosen point of the 3rd save). A save writes ``last.ckpt.partial/``, then
global rank 0 swaps it in (``chunkflow_pl/strategy/checkpoint.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from test_preemption import COMMON, LossLog

from train import train

pytestmark = pytest.mark.slow
EVERY_STEP = ["callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_last=true",
              "callbacks.checkpoint.save_top_k=0"]
KILL_AT_SAVE = 3  # the save of step 3: step 2's last.ckpt is the one that must survive

DRIVER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
    from pathlib import Path
    import hydra
    import torch
    import torch.distributed.checkpoint as dcp
    import train
    from chunkflow_pl.strategy import checkpoint as ckpt
    from test_preemption import LossLog

    point, saves = os.environ["KILL_POINT"], [0]

    def die(at):
        if at == point and saves[0] == {KILL_AT_SAVE}:
            os.kill(os.getpid(), signal.SIGKILL)

    save = ckpt.save_checkpoint
    def counted(*a, **k):
        saves[0] += 1
        return save(*a, **k)
    ckpt.save_checkpoint = counted

    finish = dcp.FileSystemWriter.finish
    def finish_then_die(self, *a, **k):
        die("shards")  # every shard written, DCP's index not yet
        return finish(self, *a, **k)
    dcp.FileSystemWriter.finish = finish_then_die

    torch_save = torch.save
    def save_then_die(obj, f, *a, **k):
        if str(f).endswith("meta.pt.tmp"):
            die("index")  # DCP's index written, meta.pt not yet
        return torch_save(obj, f, *a, **k)
    torch.save = save_then_die

    commit = ckpt._commit
    def commit_then_die(path, partial):
        die("complete")  # the staging folder complete, not yet current
        return commit(path, partial)
    ckpt._commit = commit_then_die

    rename = Path.rename
    def rename_then_die(self, target):
        out = rename(self, target)
        if str(target).endswith(".old"):
            die("swap")  # last.ckpt moved aside, the new one not yet in its place
        return out
    Path.rename = rename_then_die

    @hydra.main(version_base="1.3", config_path={str(ROOT / 'conf')!r}, config_name="train")
    def main(cfg):
        sys.exit(train.run(cfg, callbacks=[LossLog(os.environ["LOSS_LOG"])]))

    main()
""")


def _cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*COMMON, f"output_dir={out}", *overrides])


def _steps(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    train(_cfg(d, f"export.hf_dir={d / 'hf'}"), callbacks=[LossLog(str(d / "losses"))])
    return (d / "hf" / "model.safetensors").read_bytes()


POINTS = ["shards", "index", "complete", "swap"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The four killed runs, started together before the in-process reference run: each is a separate process that
    mostly imports and starts up, so on two cores they overlap instead of queueing. point -> (process, folder);
    a test waits for its own."""
    procs = {}
    common = [o for o in COMMON if o != "callbacks.checkpoint=null"]
    for point in POINTS:
        d = tmp_path_factory.mktemp(f"killed_{point}")
        (d / "driver.py").write_text(DRIVER)
        env = {**os.environ, "KILL_POINT": point, "LOSS_LOG": str(d / "killed.losses")}
        cmd = [sys.executable, str(d / "driver.py"), *common, *EVERY_STEP,
               f"callbacks.checkpoint.dirpath={d / 'killed' / 'checkpoints'}", f"hydra.run.dir={d / 'killed'}"]
        with open(d / "out.log", "w") as log:  # a file, not a pipe: a full pipe would block a run not yet waited for
            procs[point] = (subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT), d)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_and_resuming_it_is_exact(tmp_path, killed, reference,
                                                                                       point):
    proc, d = killed[point]
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, (d / "out.log").read_text()[-3000:]
    assert _steps(d / "killed.losses") == [1, 2, 3]  # killed in step 3's save

    log = tmp_path / "resumed.losses"
    last = d / "killed" / "checkpoints" / "last.ckpt"
    train(_cfg(tmp_path / "resumed", f"ckpt_path={last}", f"export.hf_dir={tmp_path / 'hf'}"),
          callbacks=[LossLog(str(log))])
    assert _steps(log) == [3, 4]  # resumed from step 2's checkpoint, whatever the kill left
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == reference


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A complete checkpoint after one step of the tiny model."""
    d = tmp_path_factory.mktemp("saved")
    out = train(_cfg(d / "run", "trainer.max_steps=1"))
    good = d / "good.ckpt"
    out["trainer"].save_checkpoint(good)
    assert not list(d.glob("*.partial")) and not list(d.glob("*.old"))  # nothing left beside it
    return good


def _resume(tmp_path: Path, ckpt: Path, *overrides: str):
    return train(_cfg(tmp_path / "resume", "trainer.max_steps=2", f"ckpt_path={ckpt}", *overrides))


def test_a_cut_short_shard_is_named(tmp_path, saved):
    bad = tmp_path / "cut.ckpt"
    shutil.copytree(saved, bad)
    (shard,) = bad.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"ckpt_path={bad}: shard {shard.name} is cut short \(\d+ bytes, its "
                                         r"index needs \d+\)"):
        _resume(tmp_path, bad)


def test_a_missing_index_is_named(tmp_path, saved):
    bad = tmp_path / "noindex.ckpt"
    shutil.copytree(saved, bad)
    (bad / ".metadata").unlink()
    with pytest.raises(ValueError, match=rf"ckpt_path={bad} is not a complete chunkflow_pl checkpoint directory: "
                                         r"\.metadata missing"):
        _resume(tmp_path, bad)


def test_a_checkpoint_of_another_model_says_so(tmp_path, saved):
    with pytest.raises(ValueError, match=rf"ckpt_path={saved} was written by another model: \d+ of this model's "
                                         r"tensors are not in it \(e\.g\. .*layers\.1\."):
        _resume(tmp_path, saved, "model.overrides.num_layers=2")


def test_auto_resume_skips_an_incomplete_newest_preemption_checkpoint(tmp_path, saved, caplog):
    from chunkflow_pl.utils.run_dir import resume_policy

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(saved, run / "hpc_ckpt_1.ckpt")
    shutil.copytree(saved, run / "hpc_ckpt_2.ckpt")
    (run / "hpc_ckpt_2.ckpt" / "meta.pt").unlink()  # cut off before its last part
    assert resume_policy(run, None, {}) == str(run / "hpc_ckpt_1.ckpt")
    assert "skipping the incomplete preemption checkpoint" in caplog.text and "hpc_ckpt_2.ckpt" in caplog.text
    shutil.copytree(saved, run / "hpc_ckpt_3.ckpt")
    assert resume_policy(run, None, {}) == "hpc"  # the newest is whole: Lightning's own choice
