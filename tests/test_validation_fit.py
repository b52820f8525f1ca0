"""Validation inside Lightning: exact on every layout, and invisible to training (weights, data order, resume)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from multiproc import free_port, spawn_ranks, write_token_records

from callbacks.val_position import LossByPositionPlot
from chunkflow_pl import ChunkFlowDataModule, ChunkFlowLM, ChunkFlowStrategy, DataConfig, OptimConfig, ParallelConfig
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.model.config import ModelConfig

EDGES = [16, 64]  # buckets 0-16, 16-64, >64 (the records are up to 100 tokens long)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A float64 checkpoint, a validation file, and transformers' summed CE / tokens on it, overall and by bucket."""
    d = tmp_path_factory.mktemp("val")
    hf = make_hf_model(tie=False, dtype=torch.float64, seed=7, std=0.1)
    hf.save_pretrained(d / "hf")
    seqs, labels = write_token_records(d / "val.jsonl")
    loss = torch.zeros(len(EDGES) + 1, dtype=torch.float64)
    tokens = torch.zeros(len(EDGES) + 1, dtype=torch.float64)
    with torch.no_grad():
        for s, y in zip(seqs, labels):
            t = targets_from_labels(s, y)
            ce = F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="none")
            b = torch.bucketize(torch.arange(1, len(s) + 1), torch.tensor(EDGES), right=True)
            loss.index_add_(0, b, ce)
            tokens.index_add_(0, b, (t != -100).double())
    ref = {"loss": float(loss.sum() / tokens.sum()), "buckets": (loss / tokens).tolist(), "tokens": tokens.tolist()}
    return d, ref


def validate(d: Path, parallel: ParallelConfig, devices: int, chunk_size: int) -> dict:
    """``Trainer.validate`` of the checkpoint on the file under ``parallel``: this rank's ``ValidationResult``."""
    if devices > 1:  # a spawned rank; in pytest's own process the thread count stays (tests/conftest.py)
        torch.set_num_threads(1)
    cfg = ModelConfig.from_hf_dir(d / "hf")
    data = DataConfig(kind="jsonl", path=str(d / "val.jsonl"), val_path=str(d / "val.jsonl"), global_batch_size=7,
                      shuffle=False, cache_dir=str(d / "cache"), val_position_buckets=EDGES)
    dm = ChunkFlowDataModule(data, chunk_size=chunk_size, vocab_size=cfg.vocab_size)
    module = ChunkFlowLM(cfg, OptimConfig(), loss_chunk=16, pretrained=str(d / "hf"),
                         val_position_buckets=data.val_position_buckets)
    strategy = ChunkFlowStrategy(parallel, chunk_k=1, **_environment(devices))
    trainer = L.Trainer(strategy=strategy, devices=devices, accelerator="cpu", precision="64-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    strategy.destroy_process_groups()
    r = module.val_result
    return {"loss": r.loss, "buckets": list(r.bucket_loss), "tokens": list(r.bucket_tokens),
            "logged": float(trainer.callback_metrics["val/loss"])}


def _environment(devices: int) -> dict:
    if devices == 1:
        return {}
    from lightning.fabric.plugins.environments import LightningEnvironment

    return {"cluster_environment": LightningEnvironment()}


def assert_exact(got: dict, ref: dict) -> None:
    assert abs(got["loss"] - ref["loss"]) / ref["loss"] < 1e-10, (got["loss"], ref["loss"])
    assert got["tokens"] == ref["tokens"]  # supervised tokens counted once over the job, by position
    for g, r in zip(got["buckets"], ref["buckets"]):
        assert abs(g - r) / r < 1e-10
    assert got["logged"] == pytest.approx(ref["loss"], rel=1e-6)  # what the logger got (Lightning keeps float32)


@pytest.mark.parametrize("chunk_size", [16, 48])
def test_val_loss_in_one_process_equals_transformers(case, chunk_size):
    d, ref = case
    assert_exact(validate(d, ParallelConfig(), 1, chunk_size), ref)


LAYOUTS = {"dp2": {"dp": 2}, "pp2": {"pp": 2}, "dp_shard2": {"dp_shard": 2}}


def _layouts_worker(rank: int, d: str, ports: list[int], out: str) -> None:
    results = {}
    for (name, layout), port in zip(LAYOUTS.items(), ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                          LOCAL_RANK=str(rank), RANK=str(rank))
        results[name] = validate(Path(d), ParallelConfig(**layout), 2, 16)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_val_loss_is_exact_under_dp_pp_and_fsdp(case, tmp_path):
    """2 gloo ranks, one after another: dp=2 (each rank half the chunks), pp=2 (the loss on the last stage only),
    dp_shard=2 (FSDP2 units gathered for the pass). Every rank logs the job's numbers, equal to transformers'."""
    d, ref = case
    spawn_ranks(_layouts_worker, (str(d), [free_port() for _ in LAYOUTS], str(tmp_path)), timeout=240,
                hang="validation hangs under a 2-rank layout")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in LAYOUTS:
            assert_exact(got[name], ref)


# ---- validation must not disturb training -------------------------------------------------------------------


class Record(L.Callback):
    """The sample ids of every training batch, in order, and the validation passes seen."""

    def __init__(self) -> None:
        self.order: list[list[int]] = []
        self.val_losses: list[tuple[int, float]] = []  # (global step, val/loss)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.order.append(list(batch.sample_ids))

    def on_validation_end(self, trainer, pl_module) -> None:
        if pl_module.val_result is not None:
            self.val_losses.append((trainer.global_step, pl_module.val_result.loss))


def fit(tmp: Path, steps: int, validate_every: int | None, ckpt_every: int | None = None,
        resume: str | None = None) -> tuple[dict[str, torch.Tensor], Record]:
    L.seed_everything(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    data = DataConfig(num_sequences=40, max_len=300, global_batch_size=4, val_fraction=0.2, seed=3)
    dm = ChunkFlowDataModule(data, chunk_size=64, vocab_size=cfg.vocab_size)
    module = ChunkFlowLM(cfg, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), loss_chunk=32)
    rec = Record()
    callbacks: list[L.Callback] = [rec, LossByPositionPlot()]
    if ckpt_every:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=ckpt_every,
                                                             save_top_k=-1))
    val = {"val_check_interval": validate_every} if validate_every else {"limit_val_batches": 0}
    trainer = L.Trainer(strategy=ChunkFlowStrategy(ParallelConfig(), chunk_k=1), devices=1, accelerator="cpu",
                        precision="64-true", max_steps=steps, logger=False, enable_checkpointing=bool(ckpt_every),
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, default_root_dir=tmp, **val)
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True if resume else None)
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}, rec


def test_validation_leaves_training_bit_identical_and_resumes(tmp_path):
    """12 training steps (past an epoch end: 32 training sequences = 8 batches), validation every 3 steps or never:
    the same batches in the same order, the same weights bit for bit; a run resumed from step 6 (after a validation
    pass) validates and trains on to the same weights and the same validation losses."""
    plain, plain_rec = fit(tmp_path / "plain", 12, None)
    with_val, val_rec = fit(tmp_path / "val", 12, 3, ckpt_every=6)
    assert val_rec.order == plain_rec.order and len(plain_rec.order) == 12
    # Lightning counts an integer val_check_interval within each epoch: after batches 3 and 6 of each epoch of 8
    assert [s for s, _ in val_rec.val_losses] == [3, 6, 11] and all(math.isfinite(v) for _, v in val_rec.val_losses)
    assert plain_rec.val_losses == []
    assert sorted(p.name for p in (tmp_path / "val" / "val_loss_by_position").glob("*.png")) == [
        "step_000003.png", "step_000006.png", "step_000011.png"]  # the plot of each pass (no logger: the file only)
    for n, p in plain.items():
        assert torch.equal(p, with_val[n]), n
    step6 = next((tmp_path / "val" / "ckpt").glob("*step=6.ckpt"))
    resumed, res_rec = fit(tmp_path / "resumed", 12, 3, resume=str(step6))
    assert res_rec.order == val_rec.order[6:]
    assert res_rec.val_losses == val_rec.val_losses[2:]  # the pass at step 6 ran before the checkpoint was taken
    for n, p in plain.items():
        assert torch.equal(p, resumed[n]), n
