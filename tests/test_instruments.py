"""Callbacks on a real run: FLOPs/MFU against a hand count, K/V state bytes against a hand count and the
store's own, chunk statistics, and the histogram PNG handed to a logger that takes images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.flops import ModelFlops
from chunkflow_pl.schedule.step_flops import step_flops
from train import train

# hidden D = 8, 2 heads of 4 -> q width 8; 1 kv head -> Dkv = 4; F = 12; V = 50; 2 layers
TINY = dict(vocab_size=50, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2, num_kv_heads=1)
LENS = [10, 2, 3]
CHUNK = 6
# chunk.size = 6: sequence 0 is cut into [0:6) | [6:10); packing puts 0[6:10) and 1[0:2) together, 2[0:3) alone:
#   chunk 0: 0[0:6)              6 new tokens, no prefix   -> pairs 6*7/2        = 21
#   chunk 1: 0[6:10) 1[0:2)      4 tokens after a 6-token prefix: 4*6 + 4*5/2 = 34; 2 tokens: 3
#   chunk 2: 2[0:3)              3 tokens                  -> pairs 3*4/2        = 6
# tokens 15, pairs 64.
# Per token and layer: q, o 2*8*8 each = 256; k, v 2*8*4 each = 128; gate, up, down 2*8*12 each = 576 -> 960
# Head 2*50*8 = 800 per token. Per pair and layer 4*8 = 32.
# Forward = 15 * (2*960 + 800) + 64 * (2*32) = 40800 + 4096 = 44896; model FLOPs = 3 * 44896 = 134688.
# k = 1: chunk 0 is dropped and recomputed. Its recompute and backward are the model FLOPs above; its
# first forward was kv-only: layer 1 in full, layer 2's k, v only, no head -> per token 960 + 128 = 1088,
# per pair 32 (layer 1's attention): 6 * 1088 + 21 * 32 = 7200 more hardware FLOPs.
MODEL_FLOPS = 134688
DROPPED_FORWARD_FLOPS = 7200
# State of sequence 0 in float64: per layer k and v [10, 1, 4] (8 bytes) and their float64 gradient
# accumulators: 4 * 10 * 4 * 8 = 1280 bytes per layer, 2560 bytes for 2 layers.
STATE_BYTES = 2560


class ImageCSVLogger(CSVLogger):
    """A real CSV logger that also takes images (as WandbLogger.log_image does), recording each call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.images: list[tuple[str, list[str], int | None]] = []

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
        self.images.append((key, list(images), step))


def _batch():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 50, (n,), generator=g) for n in LENS]
    return seqs


def test_step_flops_match_the_hand_count():
    seqs = _batch()
    plan = build_chunk_plan(LENS, CHUNK)
    assert [[tuple(s) for s in c] for c in plan.chunks] == [[(0, 0, 6)], [(0, 6, 10), (1, 0, 2)], [(2, 0, 3)]]
    batch = assemble_step(plan.chunks, seqs, [targets_from_labels(s) for s in seqs], LENS, [0, 1, 2],
                          sum(n - 1 for n in LENS), 0, len(plan.chunks))
    chunks = [c.segments for c in batch.chunks]
    fl = step_flops(ModelFlops.from_config(ModelConfig(**TINY)), chunks, recomputed=[0])
    assert fl.model == MODEL_FLOPS
    assert fl.dropped == DROPPED_FORWARD_FLOPS
    # a middle stage (no head) sends its output, so its dropped forward is a full one: 6 * 1920 + 21 * 64
    middle = ModelFlops.from_config(ModelConfig(**TINY), head=False)
    assert step_flops(middle, chunks, [0]).dropped == 6 * 1920 + 21 * 64


@pytest.fixture(scope="module")
def instrumented_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("instr")
    with (d / "data.jsonl").open("w") as f:
        for s in _batch():
            f.write(json.dumps({"input_ids": s.tolist()}) + "\n")
    overrides = [f"output_dir={d}", "logger=csv", f"logger._target_={__name__}.ImageCSVLogger",
                 "callbacks.progress=null", "callbacks.checkpoint=null", "data=jsonl", f"data.path={d / 'data.jsonl'}",
                 f"data.cache_dir={d / 'cache'}", "data.global_batch_size=3", "data.shuffle=false",
                 f"chunk.size={CHUNK}", "chunk.k=1", "trainer.precision=64-true", "trainer.max_steps=2",
                 "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "callbacks.throughput.peak_flops=1e9",
                 "callbacks.chunk_stats.histogram_every_n_steps=2",
                 *[f"model.overrides.{k}={v}" for k, v in TINY.items()]]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    out = train(cfg)
    rows = list(csv.DictReader(open(next(d.glob("csv/version_*/metrics.csv")))))
    metrics = [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("perf/model_tflop")]
    return d, out, metrics


def test_logged_flops_and_mfu_match_the_hand_count(instrumented_run):
    _, _, metrics = instrumented_run
    assert len(metrics) == 2  # one row per step: the same batch twice
    for m in metrics:
        assert m["perf/model_tflop"] == pytest.approx(MODEL_FLOPS / 1e12, rel=1e-6)  # logged as float32
        assert m["perf/peak_tflop_per_s"] == pytest.approx(1e-3)
        assert m["perf/mfu"] == pytest.approx(MODEL_FLOPS / m["train/step_time_s"] / 1e9, rel=1e-5)
        # the recomputed chunk comes from the scheduler the strategy ran (k = 1: chunk 0 runs forward twice,
        # the first time kv-only)
        hw_over_model = (MODEL_FLOPS + DROPPED_FORWARD_FLOPS) / MODEL_FLOPS
        assert m["perf/hfu"] / m["perf/mfu"] == pytest.approx(hw_over_model, rel=1e-5)


def test_logged_state_bytes_match_the_hand_count_and_the_store(instrumented_run):
    _, out, metrics = instrumented_run
    assert out["module"].last_stats.peak_state_bytes == STATE_BYTES  # the store's own count, through StepStats
    for m in metrics:
        assert m["mem/kv_state_mib"] * 2**20 == pytest.approx(STATE_BYTES, rel=1e-6)
        assert m["mem/live_chunks"] == 1.0  # k = 1
        assert m["mem/host_rss_mib"] > 50  # a real process reading: torch alone is bigger


def test_chunk_statistics_of_the_step(instrumented_run):
    _, _, metrics = instrumented_run
    m = metrics[-1]
    assert m["chunks/count"] == 3
    assert m["chunks/fill"] == pytest.approx(15 / 18, rel=1e-6)
    assert m["chunks/segments_per_chunk"] == pytest.approx(4 / 3, rel=1e-6)
    assert (m["chunks/chains"], m["chunks/chain_len_mean"], m["chunks/chain_len_max"]) == (1, 2, 2)
    assert m["chunks/recomputed"] == 1
    assert "train/tokens_per_s" in m


def test_histogram_png_is_written_and_logged_as_an_image(instrumented_run):
    d, out, _ = instrumented_run
    (logger,) = out["trainer"].loggers
    png = d / "chunk_histograms" / "step_000002.png"
    assert logger.images == [("chunks/length_histogram", [str(png)], 2)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (d / "chunk_histograms").iterdir()) == ["step_000002.png"]  # every 2 steps only


def test_callbacks_run_with_no_logger(tmp_path):
    overrides = [f"output_dir={tmp_path}", "logger=none", "callbacks.progress=null", "callbacks.checkpoint=null",
                 "data.num_sequences=8", "data.max_len=300", "data.global_batch_size=4", "chunk.size=128",
                 "trainer.max_steps=1", "trainer.accelerator=cpu", "callbacks.chunk_stats.histogram_every_n_steps=1",
                 *[f"model.overrides.{k}={v}" for k, v in TINY.items()]]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        out = train(compose("train", overrides=overrides))
    assert (Path(tmp_path) / "chunk_histograms" / "step_000001.png").is_file()
    logged = out["trainer"].callback_metrics
    assert {"perf/mfu", "mem/host_rss_mib", "chunks/fill", "train/tokens_per_s"} <= set(logged)
