"""parallel.collective_timeout: a rank that stops answering (SIGSTOP: alive, but hung) is named by the other
ranks within the timeout, on the data-parallel all-reduce and on the pipeline's point-to-point channels alike
(torch gives new groups its own 30-minute default, not the run's), and its value is printed at start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from multiproc import ROOT, train_cmd, train_env, write_token_records

pytestmark = pytest.mark.slow
TIMEOUT_S = 20
SMALL = ["model.overrides.num_layers=2", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
         "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "model.overrides.vocab_size=97"]


def _worker(marker: str, rank: int) -> int:
    """The pid of the train.py worker of global rank ``rank`` launched with ``CHUNKFLOW_TEST_MARK=marker``."""
    want = {f"CHUNKFLOW_TEST_MARK={marker}".encode(), f"RANK={rank}".encode()}
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and want <= set((p / "environ").read_bytes().split(b"\0")) \
                    and b"train.py" in (p / "cmdline").read_bytes():
                return int(p.name)
        except OSError:
            continue
    raise AssertionError(f"no worker of rank {rank}")


def _logged_at(line: str) -> float:
    """The wall-clock time of a Hydra log line ``[2026-12-03 14:37:52,064][...]``."""
    return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _start(tmp_path: Path, layout: str) -> tuple[subprocess.Popen, Path, str, Path]:
    """An endless 2-rank run of ``layout``; its output goes to a file (the other layout's run is waited for
    meanwhile, and a full pipe would block this one)."""
    folder = tmp_path / layout.replace(".", "_").replace("=", "")
    folder.mkdir()
    write_token_records(folder / "data.jsonl")
    run, marker, log = folder / "run", uuid.uuid4().hex, folder / "out.log"
    # progress: the CSV rank 0 writes after every step (no collective in it, unlike a checkpoint save)
    cmd = train_cmd(2, "logger=csv", "+logger.flush_logs_every_n_steps=1", "trainer.log_every_n_steps=1",
                    "callbacks.progress=null", "callbacks.checkpoint=null", "trainer.enable_model_summary=false",
                    "trainer.accelerator=cpu", f"hydra.run.dir={run}", "data=jsonl",
                    f"data.path={folder / 'data.jsonl'}", f"data.cache_dir={folder / 'cache'}",
                    "data.global_batch_size=7", "chunk.size=32", *SMALL, "trainer.max_steps=100000", layout,
                    f"parallel.collective_timeout={TIMEOUT_S}s")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**train_env(), "CHUNKFLOW_TEST_MARK": marker}, stdout=f,
                                stderr=subprocess.STDOUT, text=True)
    return proc, run, marker, log


def test_a_stopped_rank_ends_the_run_within_the_collective_timeout(tmp_path):
    """Both layouts at once: each run mostly waits (start-up, then the timeout), so the two overlap; every
    check is made per layout, on its own run's output."""
    layouts = ["parallel.dp=2", "parallel.pp=2"]
    runs = {layout: _start(tmp_path, layout) for layout in layouts}
    stopped: dict[str, int] = {}
    t_stop: dict[str, float] = {}
    try:
        deadline = time.time() + 300
        while len(stopped) < len(runs):  # stop rank 1 of each run once it has done a step (both ranks training)
            for layout, (proc, run, marker, log) in runs.items():
                if layout in stopped:
                    continue  # it may end now: its timeout runs while the other layout starts up
                if list(run.glob("csv/version_*/metrics.csv")):
                    stopped[layout] = _worker(marker, 1)
                    os.kill(stopped[layout], signal.SIGSTOP)
                    t_stop[layout] = time.time()
                assert proc.poll() is None and time.time() < deadline, (layout, log.read_text()[-3000:])
            time.sleep(0.2)
        for proc, *_ in runs.values():  # torchrun ends the stopped rank after the other fails
            proc.wait(timeout=TIMEOUT_S + 120)
    finally:
        for pid in stopped.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc, *_ in runs.values():
            if proc.poll() is None:
                proc.kill()
    for layout, (proc, _, _, log) in runs.items():
        out = log.read_text()
        assert proc.returncode != 0, (layout, out[-3000:])
        assert len(re.findall(rf"rank [01]: gloo process group of 2 ranks, collective timeout {TIMEOUT_S}s "
                              rf"\(parallel\.collective_timeout\)", out)) == 2, (layout, out[-3000:])
        # rank 0 names the stopped rank, within the timeout (plus a step's compute before it waits, on a loaded
        # machine)
        errors = [line for line in out.splitlines() if re.match(r"\[[-0-9 :,]{23}\]\[.*\]\[ERROR\]", line)]
        assert errors and re.search(r"rank 0: rank\(s\) \[1\] of this run stopped answering( during step \d+)? "
                                    r"\(process stopped", errors[0]), (layout, out[-3000:])
        assert _logged_at(errors[0]) - t_stop[layout] < TIMEOUT_S + 30, (layout, errors[0], out[-3000:])
