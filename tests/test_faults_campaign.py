"""A fixed-seed slice of the fault campaign (``benchmarks/faults.py``, README "Fault campaign"), as users run it.

Seed 14 over ``parallel.pp=2`` with faults aimed at start-up and checkpoint saves draws two trials: SIGTERM to one
rank just before the process group is created (the signal is held until the first step start, where every rank
agrees and stops: exit 143 on both, a checkpoint of step 0) and SIGKILL to one rank while rank 0 makes a save
current. Both then resume (a restarted job in the same folder) to the uninterrupted run's weights byte for byte,
which under pp=2 needs the optimizer state keyed by parameter name. No rank may outlive the campaign's deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow
SLICE = ["--layouts", "pp", "--phases", "startup,save", "--trials", "2", "--seed", "14"]
DEADLINE_S = 240  # ~40 s on an idle 2-core box; a rank that hangs is ended by the campaign after its own deadline


def test_the_campaign_slice_stops_cleanly_keeps_its_checkpoints_and_resumes_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), *SLICE, "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    out = r.stdout + r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert r.returncode == 0, out[-4000:]
    assert result["trials"] == 2 and result["not_reached"] == 0, out[-4000:]
    assert result["points"] == {"startup:pg_before": 1, "save:commit": 1}, result["points"]
    assert (result["hangs"], result["lost_checkpoints"], result["resume_mismatches"], result["bad_exit_codes"]) \
        == (0, 0, 0, 0), out[-4000:]
    assert result["clean_stops"] == 1  # the SIGTERM trial: 143 on both ranks
    assert "exit {0: 143, 1: 143}" in out or "exit {1: 143, 0: 143}" in out, out[-4000:]
    assert time.monotonic() - t0 < DEADLINE_S
