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
from meta_device import parameters_on_meta
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


@pytest.mark.parametrize("precision,dtype", [("64-true", torch.float64), ("32-true", torch.float32),
                                             ("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_every_preset_composes_and_the_estimate_counts_the_real_weights(tmp_path, precision, dtype):
    """The estimate's weights and gradients are the bytes of the decoder each preset builds (on the meta device,
    in the dtype Lightning keeps the weights in for that precision)."""
    from chunkflow_pl.model.decoder import Qwen2Decoder

    for preset in ("tiny", "qwen0.5b", "qwen1.5b", "qwen3b", "qwen7b", "qwen14b", "qwen32b", "qwen72b"):
        res = train(compose_cfg(tmp_path, f"model={preset}", "dry_run=true", "chunk.size=32k",
                                f"trainer.precision={precision}"))
        assert res["model_config"].name == preset
        with parameters_on_meta():
            model = Qwen2Decoder(res["model_config"]).to(dtype)
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        assert res["memory"].weights == real and res["memory"].grads == real, preset


def test_bad_chunk_size_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"chunk\.size='32kb'.*32k, 256K, 1m"):
        train(compose_cfg(tmp_path, "chunk.size=32kb"))


SMALL = ["data.num_sequences=64", "data.max_len=600", "data.global_batch_size=8", "chunk.size=256",
         "model.overrides.num_layers=1", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
         "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "trainer.accelerator=cpu"]


class _StepRecord(L.Callback):
    """Per step: exact loss and recomputed chunks; the first step's gradients (fp32 copies, by name)."""

    def __init__(self) -> None:
        self.loss, self.recomputed, self.grad = [], [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss.append(pl_module.last_stats.global_loss_sum / batch.num_label_tokens)
        self.recomputed.append(pl_module.last_stats.recomputed_chunks)
        if self.grad is None:
            self.grad = {n: p.grad.float().clone() for n, p in pl_module.model.named_parameters()}


def test_reduced_precision_follows_the_float32_run_with_split_sequences(tmp_path):
    """bf16-mixed and bf16-true on sequences split into dependent chunks (k=1: recompute + state gradients)
    track the float32 run: same plan, every parameter's first-step gradient within bf16 rounding (~1% measured;
    dropping the state gradients between chunks in bf16 makes k/v projections ~56% off), same losses."""
    runs = {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        runs[precision] = rec = _StepRecord()
        train(compose_cfg(tmp_path / precision, f"trainer.precision={precision}", "trainer.max_steps=4",
                          "data.min_len=300", "optim.warmup_steps=0", "optim.lr=1e-2", "optim.grad_clip=0", *SMALL),
              callbacks=[rec])
    ref = runs["32-true"]
    assert all(r > 0 for r in ref.recomputed)  # chains were split and recomputed
    assert ref.loss[-1] < ref.loss[0] - 0.2  # and the model learns
    for precision in ("bf16-mixed", "bf16-true"):
        got = runs[precision]
        assert got.recomputed == ref.recomputed, precision
        for name, g in ref.grad.items():
            err = (got.grad[name] - g).norm() / g.norm()
            assert err < 0.05, f"{precision} {name}: first-step gradient {err:.3f} relative to float32"
        for step, (a, b) in enumerate(zip(got.loss, ref.loss, strict=True)):
            assert abs(a - b) / b < 1e-3, f"{precision} step {step + 1}: loss {a} vs float32 {b}"


def test_cosine_without_max_steps_and_overrides_with_pretrained_are_clear_errors(tmp_path, hf_dir):
    with pytest.raises(ValueError, match="trainer.max_steps > 0"):
        train(compose_cfg(tmp_path, "trainer.max_steps=-1", "trainer.max_epochs=1", *SMALL))
    with pytest.raises(ValueError, match=r"parallel.dp x parallel.pp = 1 x 1 = 1 processes, but the run has 2"):
        train(compose_cfg(tmp_path, "trainer.devices=2", *SMALL))
    with pytest.raises(ValueError, match="cannot change the architecture"):
        train(compose_cfg(tmp_path, f"model.pretrained={hf_dir}", "model.overrides.num_layers=3"))


def test_parallel_presets_compose_and_pipelines_estimate_the_largest_stage(tmp_path):
    from chunkflow_pl.model.memory import Sharding, estimate_training_memory, stage_params
    from chunkflow_pl.model.stages import split_stages

    runs = {p: train(compose_cfg(tmp_path, f"parallel={p}", "model=qwen7b", "chunk.size=8k", "dry_run=true"))
            for p in ("single", "dp2", "pp2", "dp2_pp2")}
    cfg = runs["single"]["model_config"]
    whole = estimate_training_memory(cfg, 8192, 1, "32-true")
    assert runs["single"]["memory"] == whole
    # replicas run on FSDP2 with a shard of 1, which still gathers a separate compute copy of the parameters
    replicas = Sharding(dp_shard=1, dp_replicate=2)
    assert runs["dp2"]["memory"] == estimate_training_memory(cfg, 8192, 1, "32-true", sharding=replicas)
    assert runs["dp2"]["memory"].gathered == 4 * cfg.num_params()
    first, last = split_stages(cfg.num_layers, 2)
    for p, sharding in (("pp2", None), ("dp2_pp2", replicas)):
        est = runs[p]["memory"]
        # 7B is untied: stage 0 (embedding, 14 layers, 2 chunks live) outweighs stage 1 (14 layers, head, 1 chunk).
        assert est.params == stage_params(cfg, first) and est.total < whole.total
        assert est == estimate_training_memory(cfg, 8192, 1, "32-true", stage=first, live_chunks=2, sharding=sharding)
    assert stage_params(cfg, first) + stage_params(cfg, last) == cfg.num_params()


def test_timeline_of_a_one_process_step_is_its_plan_and_is_logged(tmp_path):
    from single_device_oracle import plan_single_device

    from chunkflow_pl.data.types import Segment

    train(compose_cfg(tmp_path, "trainer.max_steps=2", "data.min_len=300", "chunk.k=1", "logger=csv",
                      "trainer.log_every_n_steps=1", "callbacks.timeline.every_n_train_steps=2", *SMALL))
    (rec_path,) = (tmp_path / "timeline").glob("step_*.json")  # every 2nd step: the second only
    rec = json.loads(rec_path.read_text())
    assert rec["step"] == 1 and (tmp_path / "timeline" / "step_000001.png").stat().st_size > 0
    chunks = [[Segment(*seg) for seg in c] for c in rec["chunks"]]
    (stage,) = rec["stages"]
    plan = plan_single_device(chunks, rec["seq_lens"], 1)
    assert any(a.op.value == "recompute" for a in plan)
    assert [(op, c) for op, c, _, _ in stage["events"]] == [(a.op.value, a.chunk) for a in plan]
    assert stage["peak_live"] == 1 and rec["measured"]["bubble"] < 0.05  # one process: busy all along
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    assert [float(r["pipeline/bubble"]) for r in rows if r.get("pipeline/bubble")] == [rec["measured"]["bubble"]]


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_flash_attention_in_full_precision_fails_at_start(tmp_path, precision):
    cfg = compose_cfg(tmp_path, "model.attention=flash", f"trainer.precision={precision}", "trainer.accelerator=cpu")
    with pytest.raises(ValueError, match=f"model.attention=flash needs.*trainer.precision={precision}"):
        train(cfg)


def test_record_longer_than_the_model_takes_is_an_error_or_skipped(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [torch.arange(n) % 97 for n in (30, 100, 20, 40)])
    common = [f"model.pretrained={_tiny_checkpoint(tmp_path, max_positions=64)}", "data=jsonl", f"data.path={f}",
              f"data.cache_dir={tmp_path / 'cache'}", "data.global_batch_size=3", "chunk.size=32",
              "trainer.max_steps=1"]
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'input_ids' has 100 tokens, more than the model's "
                                         r"max_position_embeddings=64"):
        train(compose_cfg(tmp_path / "a", *common))
    out = train(compose_cfg(tmp_path / "b", *common, "data.on_bad_record=skip"))
    assert out["datamodule"].skipped_records == 1 and out["datamodule"].store.lengths.tolist() == [30, 20, 40]


def _tiny_checkpoint(tmp_path: Path, max_positions: int) -> Path:
    hf = make_hf_model(tie=True, dtype=torch.float32, layers=1, max_positions=max_positions)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_memory_estimate_counts_the_state_of_the_longest_sequence_of_the_data(tmp_path):
    """The K/V state term follows the data's real longest sequence (jsonl data has no data.max_len)."""
    states = {}
    for n in (8192, 65536):
        f = write_jsonl(tmp_path / f"d{n}.jsonl", [torch.arange(m) % 97 for m in (5, n, 300)])
        res = train(compose_cfg(tmp_path, "dry_run=true", "data=jsonl", f"data.path={f}", "chunk.size=1k",
                                f"data.cache_dir={tmp_path / 'cache'}", "model.overrides.max_position_embeddings=64k"))
        assert res["longest_sequence"] == n
        states[n] = res["memory"].state
    assert states[8192] > 0 and states[65536] == 8 * states[8192]  # linear in the longest sequence


def test_dp_balance_weighs_chunks_with_the_trained_model(tmp_path):
    from chunkflow_pl.schedule.cost import CostModel

    res = train(compose_cfg(tmp_path, "trainer.max_steps=1", *SMALL))
    # the datamodule balances ranks with the trained model's own cost model, not a fixed hidden size
    assert res["datamodule"].chunk_cost == CostModel.from_model(res["model_config"], 1).balance_cost()


@pytest.mark.parametrize("override,message", [
    ("trainer.precision=16-true", r"trainer\.precision=16-true is not supported: float16 weights .* overflow"),
    ("trainer.precision=16-mixed", r"trainer\.precision=16-mixed is not supported: .*loss scaling"),
    ("trainer.precision=transformer-engine", r"trainer\.precision=transformer-engine is not supported"),
    ("export.dtype=float8", r"export\.dtype='float8' is unknown; choose one of bfloat16, float16, float32, float64"),
], ids=["16-true", "16-mixed", "transformer-engine", "float8-export"])
def test_unsupported_precisions_and_export_dtypes_fail_before_the_data_is_read(tmp_path, override, message):
    """The data file does not exist: a check that came after tokenising would fail on it instead."""
    with pytest.raises(ValueError, match=message):
        train(compose_cfg(tmp_path, override, "data=jsonl", f"data.path={tmp_path / 'missing.jsonl'}"))


def test_an_unsupported_precision_is_a_one_line_error_before_the_estimate(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "trainer.precision=16-mixed", "export.dtype=float8", "logger=none",
                        f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: trainer.precision=16-mixed is not supported")
    assert "Traceback" not in r.stderr and "estimated training memory" not in r.stdout + r.stderr
