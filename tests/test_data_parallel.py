"""Data parallelism across processes (issue 8): torchrun with 2 gloo processes trains exactly as 1 process.

The global batch mixes sequences split into chains of dependent chunks (chunk.size 32, up to 100 tokens)
and short ones packed together; with dp=2 each rank runs its balanced share (a chain never crosses ranks)
and gradients are summed after the step's last backward.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import hf_reference_step, make_hf_model
from multiproc import ROOT, run_train, train_cmd, train_env, write_token_records
from safetensors.torch import load_file
from step_gate import open_gate, wait_at_gate

COMMON = ["data=jsonl", "data.global_batch_size=7", "data.shuffle=false", "chunk.size=32", "chunk.k=1",
          "trainer.precision=64-true", "optim.weight_decay=0", "optim.grad_clip=0", "model.loss_chunk=16"]
ADAMW = ["optim=adamw", "optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_steps=0"]

pytestmark = pytest.mark.slow
STEPS = 6  # of the uninterrupted reference; the interrupted runs resume up to it


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    make_hf_model(tie=False, dtype=torch.float32, seed=7, std=0.1).save_pretrained(d / "hf")
    seqs, labels = write_token_records(d / "data.jsonl")
    return d, seqs, labels


def data_args(d: Path) -> list[str]:
    return [f"model.pretrained={d / 'hf'}", f"data.path={d / 'data.jsonl'}", f"data.cache_dir={d / 'cache'}", *COMMON]


def ckpt_args(run: Path) -> list[str]:
    return [f"callbacks.checkpoint.dirpath={run / 'ckpt'}", "callbacks.checkpoint.every_n_train_steps=1",
            "callbacks.checkpoint.save_top_k=-1", "callbacks.checkpoint.save_last=false"]


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        err = float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300))
        assert err < rtol, f"{k}: relative difference {err:.2e}"


def step_ckpt(run: Path, step: int) -> Path:
    (p,) = (run / "ckpt").glob(f"*step={step}.ckpt")
    return p


def test_dp2_trains_like_one_process_and_resumes_across_layouts(case, tmp_path):
    d, _, _ = case
    one, two = tmp_path / "dp1", tmp_path / "dp2"
    run_train(1, one, *data_args(d), *ADAMW, "trainer.max_steps=2", f"export.hf_dir={one / 'export'}", *ckpt_args(one))
    run_train(2, two, *data_args(d), *ADAMW, "trainer.max_steps=2", f"export.hf_dir={two / 'export'}",
              *ckpt_args(two), "parallel.dp=2")
    w1, w2 = exported(one), exported(two)
    assert_close(w2, w1, 1e-8)
    assert any(not torch.equal(w2[k], load_file(str(d / "hf" / "model.safetensors"))[k.replace("model.", "model.")])
               for k in w2)  # the weights moved

    # The merged export loads in transformers with the same logits.
    from transformers import Qwen2ForCausalLM

    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    l1 = Qwen2ForCausalLM.from_pretrained(one / "export").eval()(ids).logits
    l2 = Qwen2ForCausalLM.from_pretrained(two / "export").eval()(ids).logits
    torch.testing.assert_close(l2, l1, rtol=1e-7, atol=1e-7)

    # Resume the dp=2 run's step-1 checkpoint in 1 process, and the 1-process one with dp=2.
    a, b = tmp_path / "dp2_then_dp1", tmp_path / "dp1_then_dp2"
    run_train(1, a, *data_args(d), *ADAMW, "trainer.max_steps=2", f"export.hf_dir={a / 'export'}",
              f"ckpt_path='{step_ckpt(two, 1)}'")
    run_train(2, b, *data_args(d), *ADAMW, "trainer.max_steps=2", f"export.hf_dir={b / 'export'}",
              f"ckpt_path='{step_ckpt(one, 1)}'", "parallel.dp=2")
    assert_close(exported(a), w2, 1e-8)
    assert_close(exported(b), w1, 1e-8)


def test_cli_step_with_dp2_is_minus_lr_times_the_whole_batch_gradient(case, tmp_path):
    d, seqs, labels = case
    lr = 0.5
    run_train(2, tmp_path, *data_args(d), "optim=sgd", f"optim.lr={lr}", "trainer.max_steps=1",
              "optim.warmup_steps=0", f"export.hf_dir={tmp_path / 'export'}", "parallel.dp=2",
              "callbacks.checkpoint=null")
    ref_w, ref_g = hf_reference_step(d / "hf", seqs[:7], labels[:7])
    new = exported(tmp_path)
    for k, w in new.items():
        delta, expect = w - ref_w[k], -lr * ref_g[k]
        err = float((delta - expect).norm() / expect.norm().clamp_min(1e-300))
        assert err < 1e-8, f"{k}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def uninterrupted(case, tmp_path_factory):
    """dp=2, AdamW, STEPS steps without a stop: the weights an interrupted and resumed run must reach."""
    d, _, _ = case
    ref = tmp_path_factory.mktemp("uninterrupted")
    run_train(2, ref, *data_args(d), *ADAMW, f"trainer.max_steps={STEPS}", f"export.hf_dir={ref / 'export'}",
              "parallel.dp=2", "callbacks.checkpoint=null")
    return exported(ref)


GATE_STEP = 2  # the ranks are held at the end of this step while rank 1 gets its signal


def _hit_rank1_at_the_gate(run: Path, d: Path, sig: int, layout: str = "parallel.dp=2") -> tuple[int, str]:
    """Start an endless dp=2 run, hold both ranks at the end of step ``GATE_STEP`` (before its checkpoint), send
    ``sig`` to rank 1, let them go; the run's exit code and output. Where the run stops does not depend on how
    fast this machine runs a step."""
    gate = run / "gate"
    cmd = train_cmd(2, "logger=none", "callbacks.progress=null", "trainer.enable_model_summary=false",
                    "trainer.accelerator=cpu", f"hydra.run.dir={run}", *data_args(d), *ADAMW,
                    "trainer.max_steps=1000", layout, *ckpt_args(run),
                    "+callbacks.gate._target_=step_gate.StepGate", f"+callbacks.gate.folder={gate}",
                    f"+callbacks.gate.step={GATE_STEP}")
    env = {**train_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_at_gate(gate, 2, proc)
        _child_with_env(proc.pid, "RANK", "1").send_signal(sig)
        time.sleep(0.5)  # delivered while rank 1 waits at the gate (its handler runs there)
        open_gate(gate)
        out, _ = proc.communicate(timeout=120)  # no hang: the run ends within the timeout
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


def test_killing_one_rank_stops_the_other_with_the_rank_named_and_resume_is_exact(case, uninterrupted, tmp_path):
    d, _, _ = case
    killed = tmp_path / "killed"
    returncode, out = _hit_rank1_at_the_gate(killed, d, signal.SIGKILL)
    assert returncode != 0
    assert "rank" in out and ("[1]" in out or "rank: 1" in out or "rank 1" in out), out[-3000:]

    resumed = tmp_path / "resumed"
    run_train(2, resumed, *data_args(d), *ADAMW, f"trainer.max_steps={STEPS}", f"export.hf_dir={resumed / 'export'}",
              "parallel.dp=2", f"ckpt_path='{step_ckpt(killed, 1)}'", "callbacks.checkpoint=null")
    assert_close(exported(resumed), uninterrupted, 1e-12)


@pytest.mark.parametrize("layout", ["parallel.dp=2", "parallel.dp_shard=2"], ids=["replicated", "sharded"])
def test_sigterm_to_one_rank_stops_every_rank_before_the_next_step_and_resume_is_exact(case, uninterrupted,
                                                                                       tmp_path, layout):
    """A scheduler's signal reaches ranks at different moments: the ranks agree at the next step start,
    all stop there, write one checkpoint together and exit 128 + SIGTERM (chunkflow_pl/strategy/preemption.py).
    Sharded (FSDP2 dp_shard=2): the checkpoint holds each rank's shard and resumes as the replicated run."""
    d, _, _ = case
    stopped = tmp_path / "stopped"
    returncode, out = _hit_rank1_at_the_gate(stopped, d, signal.SIGTERM, layout)
    assert returncode != 0, out[-3000:]
    # both ranks took the pre-emption path (rank 0 never got the signal itself), neither crashed
    assert out.count("preempted: stopped on SIGTERM (before step") == 2, out[-3000:]
    assert "exitcode  : 143" in out, out[-3000:]
    ckpt = stopped / "hpc_ckpt_1.ckpt"
    assert (ckpt / ".metadata").is_file(), out[-3000:]  # one DCP checkpoint, every rank's part in it
    # the ranks stop together at the first step start after the signal: the one after the gate, on both
    done = [int(n) for n in re.findall(r"SIGTERM: saved \S+ \(step (\d+) complete\)", out)]
    assert done == [GATE_STEP, GATE_STEP], out[-3000:]
    assert out.count(f"preempted: stopped on SIGTERM (before step {GATE_STEP + 1})") == 2, out[-3000:]

    if layout == "parallel.dp_shard=2":
        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = tmp_path / "resumed"
    run_train(2, resumed, *data_args(d), *ADAMW, f"trainer.max_steps={STEPS}", f"export.hf_dir={resumed / 'export'}",
              layout, f"ckpt_path='{ckpt}'", "callbacks.checkpoint=null")
    assert_close(exported(resumed), uninterrupted, 1e-12)


def _child_with_env(parent_pid: int, key: str, value: str) -> _Proc:
    """The descendant process of ``parent_pid`` whose environment has ``key=value`` (a torchrun worker)."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = next(line for line in (p / "status").read_text().splitlines() if line.startswith("PPid:"))
                parents[int(p.name)] = int(ppid.split()[1])
            except (OSError, StopIteration):
                continue

    def descends(pid: int) -> bool:
        while pid in parents and pid > 1:
            pid = parents[pid]
            if pid == parent_pid:
                return True
        return False

    want = f"{key}={value}".encode()
    for pid in parents:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if descends(pid) and want in env and b"train.py" in cmd:
            return _Proc(pid)
    raise AssertionError(f"no child of {parent_pid} with {key}={value}")


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)
