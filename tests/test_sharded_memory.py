"""The per-rank memory estimate under FSDP2 sharding (issue 21 item 5) against what sharded runs hold.

One spawned test of 4 gloo ranks on CPU, each running ``train.py``'s ``train()`` three times (a torchrun-like
environment per phase): dp_shard=2 on ranks {0, 1} and {2, 3} side by side (layer checkpointing off / on), then
pp=2 x dp_shard=2 over all four, off and on. Measured per rank: the peak of live tensor bytes from the model's
build to the end of training (``live_tensors.LiveTensorPeak``: the tensors themselves, DTensors by their local
shard; the interpreter, Lightning and gloo's own buffers are not tensors and not estimated). Estimated: the
memory check's own request for that rank's stage (``fit_setup.memory_request`` -> ``stage_estimates``), a worst
case over the stage's data-parallel ranks, so it is held to the largest measurement among them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import ROOT
from multiproc import free_port, spawn_ranks

pytestmark = pytest.mark.slow
# Small enough to run in seconds; a kept chunk's activations are a sizeable share of the peak, so that layer
# checkpointing moves it.
MODEL = ["model.overrides.hidden_size=128", "model.overrides.intermediate_size=384", "model.overrides.num_layers=4",
         "model.overrides.num_heads=4", "model.overrides.num_kv_heads=2", "model.overrides.vocab_size=2048",
         "model.overrides.tie_word_embeddings=false", "model.loss_chunk=128"]
COMMON = [*MODEL, "data.num_sequences=8", "data.global_batch_size=8", "data.max_len=512", "data.shuffle=false",
          "chunk.size=128", "chunk.k=1", "trainer.precision=32-true", "trainer.max_steps=2", "trainer.accelerator=cpu",
          "optim=adamw", "logger=none", "trainer.enable_model_summary=false", "+trainer.enable_checkpointing=false",
          *(f"callbacks.{c}=null" for c in ("progress", "throughput", "memory", "chunk_stats", "exactness",
                                           "val_position_plot", "checkpoint", "hf_export"))]


class PeakProbe(L.Callback):
    """Peak of live tensors from the model's build (``setup`` runs before ``configure_model``) to the end of
    training."""

    def setup(self, trainer, pl_module, stage) -> None:
        from live_tensors import LiveTensorPeak

        self.mode = LiveTensorPeak()
        self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        from chunkflow_pl.strategy.fit_setup import memory_request
        from chunkflow_pl.strategy.memory_check import stage_estimates

        self.mode.__exit__(None, None, None)
        self.measured = self.mode.peak
        s = trainer.strategy
        req = memory_request(s, pl_module, trainer.datamodule, str(trainer.precision))
        est = stage_estimates(req)[s.pp_rank]
        self.estimate, self.phase = est.total, est.phase


def _phase(rank: int, world: int, group_rank: int, port: int, out: Path, name: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir

    from train import train

    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(group_rank), LOCAL_RANK=str(group_rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", NODE_RANK="0")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*COMMON, f"output_dir={out / name / str(group_rank)}", *overrides])
    probe = PeakProbe()
    train(cfg, callbacks=[probe])
    (out / f"{name}.rank{group_rank}.json").write_text(json.dumps(
        {"measured": probe.measured, "estimate": probe.estimate, "phase": probe.phase}))


def _worker(rank: int, ports: list[int], out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    out = Path(out_dir)
    lc = "none" if rank < 2 else "full"  # two dp_shard=2 worlds side by side
    _phase(rank, 2, rank % 2, ports[rank // 2], out, f"shard2_{lc}",
           ["parallel.dp_shard=2", f"chunk.layer_checkpoint={lc}"])
    for i, lc in enumerate(("none", "full")):
        _phase(rank, 4, rank, ports[2 + i], out, f"pp2_shard2_{lc}",
               ["parallel.dp_shard=2", "parallel.pp=2", f"chunk.layer_checkpoint={lc}"])


def test_estimate_is_within_15_percent_of_the_measured_peak_per_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("WANDB_MODE", "offline")
    spawn_ranks(_worker, ([free_port() for _ in range(4)], str(tmp_path)), nprocs=4, timeout=300,
                hang="the sharded runs did not finish")
    results = {f.name.removesuffix(".json"): json.loads(f.read_text()) for f in tmp_path.glob("*.json")}
    assert len(results) == 12, sorted(results)
    report = {k: (round(r["measured"] / 2**20, 2), round(r["estimate"] / 2**20, 2)) for k, r in results.items()}
    stages = {"shard2_none": [(0, 1)], "shard2_full": [(0, 1)], "pp2_shard2_none": [(0, 1), (2, 3)],
              "pp2_shard2_full": [(0, 1), (2, 3)]}
    for run, groups in stages.items():
        for ranks in groups:
            measured = max(results[f"{run}.rank{r}"]["measured"] for r in ranks)
            estimate = results[f"{run}.rank{ranks[0]}"]["estimate"]
            assert abs(estimate - measured) <= 0.15 * measured, (run, ranks, report)
    # layer checkpointing shows in both the measurement and the estimate
    for run in ("shard2", "pp2_shard2"):
        full, none = results[f"{run}_full.rank0"], results[f"{run}_none.rank0"]
        assert full["measured"] < none["measured"] and full["estimate"] < none["estimate"], report
