"""The public Python API: README's "Use from Python" script, taken from README.md itself, runs as written (one
process) and with ``n = 2`` (two processes over gloo, started by Lightning); the strategy's memory check refuses
before anything is allocated."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import ROOT

# Printed after the README block: what the Trainer wired, per rank (one write per line: the ranks share stdout).
PROBE = """
print(f"wired {trainer.global_rank} {datamodule.dp_rank} {datamodule.dp_size} {trainer.global_step} "
      f"{[type(c).__name__ for c in trainer.callbacks]}")
"""


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Use from Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_script(tmp_path: Path, code: str) -> str:
    script = tmp_path / "example.py"
    script.write_text(code + PROBE)
    # Only this checkout on the path (not an installed copy); one thread per process: two share 2 cores. Buffered
    # stdout: each rank's lines reach the shared pipe in one write at exit instead of word by word.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def parse(out: str) -> tuple[list[float], list[tuple[str, ...]]]:
    # Unanchored: two ranks (and a progress bar redrawn with carriage returns) share one stdout pipe.
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+(?:e[-+]\d+)?)", out)]
    wired = re.findall(r"wired (\d) (\d) (\d) (\d) (\[[^\]]*\])", out)
    return losses, wired


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> str:
    return run_script(tmp_path_factory.mktemp("one"), readme_script())


def test_readme_script_runs_as_written(one_process):
    losses, wired = parse(one_process)
    assert len(losses) == 1 and 0 < losses[0] < 20
    ((rank, dp_rank, dp_size, steps, callbacks),) = wired
    assert (rank, dp_rank, dp_size, steps) == ("0", "0", "1", "2")
    # the strategy added its callbacks: pre-emption first, the end of the process groups last
    names = ast.literal_eval(callbacks)
    assert names[0] == "Preemption" and names[-1] == "EndProcessGroups"


@pytest.mark.slow
def test_readme_script_with_two_processes_over_gloo(tmp_path, one_process):
    code = readme_script()
    assert code.count("n = 1  #") == 1
    out = run_script(tmp_path, code.replace("n = 1  #", "n = 2  #"))
    losses, wired = parse(out)
    assert sorted(r[:4] for r in wired) == [("0", "0", "2", "2"), ("1", "1", "2", "2")], out[-3000:]
    # each rank took its half of every global batch from the strategy (both halves on one rank would double
    # the global loss): the data-parallel step is the one-process step, up to float32 summation order
    (ref,) = parse(one_process)[0]
    assert len(losses) == 2 and losses[0] == losses[1], out[-3000:]
    assert abs(losses[0] - ref) < 1e-5 * ref, (losses, ref)


def test_the_strategy_refuses_a_model_too_large_before_allocating(tmp_path):
    from chunkflow_pl import (
        ChunkFlowDataModule,
        ChunkFlowLM,
        ChunkFlowStrategy,
        DataConfig,
        InsufficientMemoryError,
        OptimConfig,
        ParallelConfig,
        get_preset,
    )

    model = get_preset("qwen72b")  # ~290 GiB of float32 weights alone
    dm = ChunkFlowDataModule(DataConfig(num_sequences=8, max_len=64, global_batch_size=4), chunk_size=64,
                             vocab_size=model.vocab_size)
    module = ChunkFlowLM(model, OptimConfig())
    trainer = L.Trainer(strategy=ChunkFlowStrategy(ParallelConfig()), devices=1, accelerator="cpu", max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    with pytest.raises(InsufficientMemoryError, match=r"model=qwen72b needs about .* GiB"):
        trainer.fit(module, datamodule=dm)
    assert module.model is None  # configure_model never ran
