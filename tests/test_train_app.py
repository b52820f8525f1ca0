"""End-to-end through ``train(cfg)``: Hydra configs, Lightning, export, exactness of one real step."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, hf_reference_step, make_hf_model
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from train import train


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", "logger=none", "callbacks.checkpoint=null",
                                           "callbacks.progress=null", *overrides])


def write_jsonl(path: Path, seqs, labels=None) -> Path:
    with path.open("w") as f:
        for i, s in enumerate(seqs):
            rec = {"input_ids": s.tolist()}
            if labels is not None:
                rec["labels"] = labels[i].tolist()
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def long_tail_case(tmp_path_factory):
    """A tiny HF checkpoint and a global batch mixing short sequences and 2x-20x chunk.size ones."""
    d = tmp_path_factory.mktemp("case")
    hf = make_hf_model(tie=False, dtype=torch.float32, seed=5, std=0.1)
    hf.save_pretrained(d / "hf")
    g = torch.Generator().manual_seed(1)
    lens = [7, 64, 640, 33, 2, 100, 32]  # chunk.size=32: 2x, 20x, exactly 1x, 1x + 1
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in lens]
    labels = [s.clone() for s in seqs]
    labels[2][:50] = -100
    write_jsonl(d / "data.jsonl", seqs, labels)
    ref_w, ref_g = hf_reference_step(d / "hf", seqs, labels)
    return d, seqs, ref_w, ref_g


def one_sgd_step(d: Path, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    cfg = compose_cfg(out, "optim=sgd", "optim.lr=1", "optim.weight_decay=0", "optim.grad_clip=0",
                      "trainer.precision=64-true", "trainer.max_steps=1", "trainer.accelerator=cpu",
                      f"export.hf_dir={out / 'export'}", f"model.pretrained={d / 'hf'}", "data=jsonl",
                      f"data.path={d / 'data.jsonl'}", "data.global_batch_size=7", "data.shuffle=false",
                      f"data.cache_dir={d / 'cache'}", *overrides)
    train(cfg)
    return load_file(str(out / "export" / "model.safetensors"))


def assert_step_is_minus_hf_gradient(new, ref_w, ref_g, rtol=1e-8):
    assert set(new) == set(ref_w)
    for k, w in new.items():
        assert w.dtype == torch.float64
        delta, expect = w - ref_w[k], -ref_g[k]
        err = (delta - expect).norm() / expect.norm().clamp_min(1e-300)
        assert err < rtol, f"{k}: relative error {err:.2e}"


def test_one_step_equals_transformers_gradient_with_sequences_that_fit(long_tail_case, tmp_path):
    d, _, ref_w, ref_g = long_tail_case
    new = one_sgd_step(d, tmp_path, "chunk.size=1k")  # every sequence fits in one chunk
    assert_step_is_minus_hf_gradient(new, ref_w, ref_g)


@pytest.mark.parametrize("extra", [["chunk.k=1"], ["chunk.k=2", "chunk.offload_state=true"], ["chunk.size=100"]])
def test_one_step_with_split_sequences_equals_transformers(long_tail_case, tmp_path, extra):
    d, _, ref_w, ref_g = long_tail_case
    new = one_sgd_step(d, tmp_path, "chunk.size=32", *extra)
    assert_step_is_minus_hf_gradient(new, ref_w, ref_g)


def test_every_k_up_to_chain_length_gives_the_same_weights(long_tail_case, tmp_path):
    d, _, _, _ = long_tail_case
    base = one_sgd_step(d, tmp_path / "whole", "chunk.size=1k")
    for k in range(1, 21):  # the 640-token sequence is a chain of 20 chunks of 32
        got = one_sgd_step(d, tmp_path / f"k{k}", "chunk.size=32", f"chunk.k={k}", "model.loss_chunk=16")
        for name, w in got.items():
            err = (w - base[name]).norm() / base[name].norm()
            assert err < 1e-8, f"k={k} {name}: {err:.2e}"


class _RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(sorted(batch.sample_ids))


def test_resume_mid_epoch_sees_the_same_global_batches(tmp_path):
    common = ["data.num_sequences=120", "data.max_len=512", "data.global_batch_size=8", "chunk.size=256",
              "model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
              "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "trainer.accelerator=cpu"]
    full = _RecordBatches()
    train(compose_cfg(tmp_path / "full", "trainer.max_steps=5", *common), callbacks=[full])

    first = _RecordBatches()
    out = train(compose_cfg(tmp_path / "a", "trainer.max_steps=2", *common), callbacks=[first])
    ckpt = tmp_path / "step2.ckpt"
    out["trainer"].save_checkpoint(ckpt)
    resumed = _RecordBatches()
    train(compose_cfg(tmp_path / "b", "trainer.max_steps=5", f"ckpt_path={ckpt}", *common), callbacks=[resumed])

    assert len(full.seen) == 5 and first.seen == full.seen[:2]
    assert resumed.seen == full.seen[2:5]


def test_default_config_learns_and_logs(tmp_path):
    cfg = compose_cfg(tmp_path, "logger=csv", "trainer.max_steps=40", "trainer.log_every_n_steps=1",
                      "data.num_sequences=400", "data.max_len=1k", "data.global_batch_size=8", "chunk.size=512",
                      "model.overrides.num_layers=2", "model.overrides.hidden_size=64", "model.overrides.num_heads=2",
                      "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=128", "optim.lr=1e-2",
                      "trainer.accelerator=cpu", f"export.hf_dir={tmp_path / 'hf'}")
    train(cfg)
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(loss) == 40
    assert sum(loss[-5:]) / 5 < loss[0] - 0.5, loss  # the Markov-chain data is learnable
    keys = set(rows[0])
    for k in ("train/lr", "train/tokens_per_s", "train/tokens_seen", "train/chunks_per_step", "train/grad_norm"):
        assert k in keys
    hparams = (next(tmp_path.glob("csv/version_*/hparams.yaml"))).read_text()
    assert "chunk:" in hparams and "global_batch_size" in hparams  # the resolved config was logged
    from transformers import Qwen2ForCausalLM

    Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")  # the export loads in transformers


def test_qwen7b_composes_and_fails_with_an_actionable_memory_message(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "model=qwen7b", "chunk.size=32k", "logger=none",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "7.616 B parameters" in out and "chunk.size=32768" in out
    assert "needs about" in out and "GiB" in out and "model=tiny" in out


def test_every_preset_composes_with_a_memory_report(tmp_path):
    for preset in ("tiny", "qwen0.5b", "qwen1.5b", "qwen3b", "qwen7b", "qwen14b", "qwen32b", "qwen72b"):
        res = train(compose_cfg(tmp_path, f"model={preset}", "dry_run=true", "chunk.size=32k"))
        assert res["model_config"].name == preset
        assert res["memory"].weights == res["model_config"].num_params() * 4


def test_bad_chunk_size_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"chunk\.size='32kb'.*32k, 256K, 1m"):
        train(compose_cfg(tmp_path, "chunk.size=32kb"))


SMALL = ["data.num_sequences=64", "data.max_len=600", "data.global_batch_size=8", "chunk.size=256",
         "model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
         "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "trainer.accelerator=cpu"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_reduced_precision_trains_with_split_sequences(tmp_path, precision):
    out = train(compose_cfg(tmp_path, f"trainer.precision={precision}", "trainer.max_steps=2", "data.min_len=300",
                            *SMALL))
    stats = out["module"].last_stats
    assert stats.recomputed_chunks >= 0 and stats.tokens > 0
    assert torch.isfinite(torch.tensor(stats.loss_sum)) and stats.loss_sum > 0


def test_cosine_without_max_steps_and_overrides_with_pretrained_are_clear_errors(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="trainer.max_steps > 0"):
        train(compose_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=1", *SMALL))
    with pytest.raises(ValueError, match=r"parallel.dp x parallel.pp = 1 x 1 = 1 processes, but the run has 2"):
        train(compose_cfg(tmp_path, "trainer.devices=2", *SMALL))
    with pytest.raises(ValueError, match="cannot change the architecture"):
        train(compose_cfg(tmp_path, f"model.pretrained={hf_dir}", "model.overrides.num_layers=3"))


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_flash_attention_in_full_precision_fails_at_start(tmp_path, precision):
    cfg = compose_cfg(tmp_path, "model.attention=flash", f"trainer.precision={precision}", "trainer.accelerator=cpu")
    with pytest.raises(ValueError, match=f"model.attention=flash needs.*trainer.precision={precision}"):
        train(cfg)
