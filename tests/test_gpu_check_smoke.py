"""``benchmarks/gpu_check.py --smoke``: the device script runs end to end on CPU with tiny shapes.

A GPU is lent to a session rarely and for minutes; a script broken by a library change (an import, a
renamed field) would spend that time on a traceback. This runs every section but ``d`` through the same
code the GPU run takes, minus the CUDA calls. Section ``d`` is a train.py subprocess: its GPU command goes
through train.py's start-up checks here (``dry_run``), the part a config change can break.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_train_app import compose_cfg

from train import train

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_smoke_runs_every_section_without_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    # each section skips points its time budget cannot fit: a budget 20x the default keeps a loaded CI
    # machine from skipping any (the asserts below need every point)
    assert load_gpu_check().main(["--smoke", "--sections", "env,a,b,c", "--budget-scale", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    assert result["errors"] == []
    # a: each CPU kernel's block attention vs the float64 reference, within its tolerance
    assert result["kernels"] and all(v.startswith("ok") for v in result["kernels"].values()), result["kernels"]
    # b: every point measured (none skipped or failed), and offload changes where the state lives, not the bits
    points = result["memory_points"]
    assert len(points) == 4 and not any("error" in p or "skipped" in p for p in points), points
    parity = result["offload_parity"]
    assert len(parity) == 2 and all(v["loss_equal"] and v["grad_norm_rel_diff"] == 0.0 for v in parity.values())
    # c: MFU and HFU measured; k=1 on a 4-chunk chain recomputes 3 chunks, so HFU > MFU
    assert [p["L"] for p in result["throughput"]] == [256, 1024]
    assert all(p["hfu"] > p["mfu"] > 0 for p in result["throughput"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())  # what a killed device run leaves behind
    assert {"env", "a", "b", "c"} <= saved.keys()


def test_gpu_check_train_command_passes_the_start_up_checks(tmp_path):
    """Section d's GPU command, composed as train.py composes it, gets past every check train.py makes
    before it builds the model (``dry_run=true``: config types, attention backend, the data against the
    model's max_position_embeddings)."""
    overrides = load_gpu_check().train_overrides(smoke=False)
    res = train(compose_cfg(tmp_path, *overrides, "dry_run=true"))
    assert res["model_config"].name == "qwen0.5b"
    assert res["longest_sequence"] > 32 * 1024  # the section trains on records longer than one chunk


def test_gpu_check_long_context_sections_smoke(tmp_path, monkeypatch, capsys):
    """Sections g, l, p, t, m (``benchmarks/gpu_long.py``) end to end on CPU with tiny shapes, and what each
    must show on any device: the step's gradients equal the float64 ones to fp32 rounding; layer
    checkpointing changes no bit; transformers' gradient on the same batch and weights is ours; the time
    split finds both attention blocks and their merge; the long stage trains both lengths to finite numbers."""
    monkeypatch.setenv("OUT", str(tmp_path))
    assert load_gpu_check().main(["--smoke", "--sections", "g,l,p,t,m", "--budget-scale", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    assert result["errors"] == []
    g = result["g"]["kernels"]["cpu-fused"]
    assert g["worst_grad_rel_err"] < 1e-5 and g["loss_rel_err"] < 1e-6, g
    for L in ("64", "256"):
        v = result["l"][f"L={L}"]
        assert v["loss_equal"] and v["grad_norm_rel_diff"] == 0.0, v
    p = result["p"]
    assert p["longest"] == 512 and "hf_oom" not in p and p["grad_rel_diff_max"] < 1e-5, p
    assert p["ours_layer_checkpoint"]["step_s"] > 0, p  # the like-for-like row (transformers recomputes too)
    t = result["t"]
    assert set(t["attention_blocks_s"]) == {"own fwd", "own bwd", "prefix fwd", "prefix bwd", "lse merge"}, t
    assert t["kernel_s_by_category"].get("attention", 0) > 0, t
    m = result["m"]
    assert [x["L"] for x in m["points"] if "step_s" in x] == [512, 4096] and m["finite"], m
