"""LoRA through peft on the chunked step: exact against transformers + peft on whole sequences (float64), only
the adapters train, and the exports load in peft / transformers with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from test_chunk_exactness import LENS, chunked_grads
from test_train_app import compose_cfg

from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, to_hf_module
from chunkflow_pl.model.lora import LoraSettings, apply_lora, export_tensors, is_adapter, save_adapter
from train import train

LORA = LoraSettings(rank=4, alpha=12.0, target=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))


def hf_name(ours: str) -> str:
    """peft's name of our adapter parameter on a PeftModel of Qwen2ForCausalLM."""
    module, rest = ours.split(".lora_")
    return f"base_model.model.{to_hf_module(module)}.lora_{rest}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our decoder and transformers + peft from one tiny checkpoint, with the same random (nonzero) adapters."""
    from peft import get_peft_model

    d = tmp_path_factory.mktemp("hf")
    make_hf_model(tie=False, dtype=torch.float64, seed=3).save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(model, d, cfg)
    apply_lora(model, LORA)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B starts at zero in peft: random both, so every adapter gradient is nonzero
        for name, p in model.named_parameters():
            if is_adapter(name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    hf = get_peft_model(make_hf_model(tie=False, dtype=torch.float64, seed=3), LORA.peft_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter(name):
                hf.get_parameter(hf_name(name)).copy_(p)
    return model, hf, cfg, d


def test_only_adapters_require_grad_and_names_keep_their_hugging_face_mapping(pair):
    model, _, _, _ = pair
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * len(LORA.target) * model.cfg.num_layers
    assert "layers.0.attn.q_proj.base_layer.weight" in dict(model.named_parameters())


@pytest.mark.parametrize("chunk_size,k", [(16, 1), (64, 2)])
def test_adapter_gradients_equal_transformers_plus_peft_on_whole_sequences(pair, chunk_size, k):
    model, hf, cfg, _ = pair
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(input_ids=s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    got, stats = chunked_grads(model, seqs, targets, n_label, chunk_size, k=k)
    assert stats.loss_sum == pytest.approx(total.item(), rel=1e-12)
    for name, p in model.named_parameters():
        if not is_adapter(name):
            assert p.grad is None and name not in got, name  # frozen: no gradient is even allocated
            continue
        want = hf.get_parameter(hf_name(name)).grad
        err = (got[name] - want).norm() / want.norm()
        assert err < 1e-8, f"{name}: relative error {err:.2e}"


def test_adapter_folder_loads_in_peft_and_merged_weights_in_transformers_with_our_logits(pair, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM

    model, _, cfg, src = pair
    ids = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    h, _ = model(ids, torch.arange(40), VarlenMeta.from_lengths([40]))
    ours = model.logits(h)
    state = model.state_dict()
    save_adapter(export_tensors(state, LORA, merge=False), LORA, tmp_path / "adapter", str(src), to_hf_module)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == LORA.alpha
    base = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float64, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    from conftest import widen_hf_precision

    widen_hf_precision(peft_model)
    torch.testing.assert_close(peft_model(input_ids=ids[None]).logits[0], ours, rtol=1e-10, atol=1e-10)
    merged = export_tensors(state, LORA, merge=True)
    assert not any(is_adapter(n) or ".base_layer." in n for n in merged)
    plain = Qwen2Decoder(cfg, loss_chunk=8).double()
    plain.load_state_dict(merged)
    h2, _ = plain(ids, torch.arange(40), VarlenMeta.from_lengths([40]))
    torch.testing.assert_close(plain.logits(h2), ours, rtol=1e-10, atol=1e-10)


class Snapshot(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_train_py_with_lora_changes_only_the_adapters_and_exports_them(tmp_path):
    out, snap = tmp_path / "adapter", Snapshot()
    res = train(compose_cfg(tmp_path, "model.lora.rank=4", "model.lora.target=[q_proj,down_proj]",
                            "trainer.max_steps=2", f"export.hf_dir={out}", "data.num_sequences=64"), callbacks=[snap])
    model = res["module"].model
    opt = res["module"].optimizers().optimizer
    adapters = [n for n, _ in model.named_parameters() if is_adapter(n)]
    assert len(adapters) == 2 * 2 * model.cfg.num_layers
    assert sum(len(g["params"]) for g in opt.param_groups) == len(opt.state) == len(adapters)  # AdamW state
    for name, p in model.named_parameters():
        moved = not torch.equal(p, snap.weights[name])
        assert moved == ("lora_B" in name or "lora_A" in name), name  # base weights bit-identical, adapters moved
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] in (["q_proj", "down_proj"],
                                                                                      ["down_proj", "q_proj"])
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change,message", [
    (dict(target=("q_proj", "qkv")), r"\['qkv'\] match no module.*'down_proj'"),
])
def test_bad_lora_settings_are_refused_naming_the_key(change, message):
    model = Qwen2Decoder(ModelConfig(num_layers=1))
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoraSettings(rank=2, **change))


def test_dropout_and_negative_rank_are_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="model.lora.dropout=0.1 is not supported.*recomputed"):
        train(compose_cfg(tmp_path, "model.lora.rank=4", "model.lora.dropout=0.1", "dry_run=true"))
    with pytest.raises(ValueError, match="model.lora.rank=-1"):
        train(compose_cfg(tmp_path, "model.lora.rank=-1", "dry_run=true"))
    with pytest.raises(ValueError, match="model.lora.rnk"):
        train(compose_cfg(tmp_path, "+model.lora.rnk=4", "dry_run=true"))


def test_a_pipeline_stage_gets_the_whole_models_random_weights_and_adapters():
    """Random init (no checkpoint) is layout-independent: building a stage runs fewer default inits, which used to
    move the global generator by a stage-dependent amount before the init seed was drawn (pp=2 then trained
    other weights than 1 process)."""
    from chunkflow_pl.model.stages import split_stages
    from chunkflow_pl.training.module import build_decoder

    cfg = ModelConfig(num_layers=4)
    models = []
    for stage in (None, *split_stages(4, 2)):
        torch.manual_seed(1234)
        models.append(dict(build_decoder(cfg, stage, "sdpa", 64, None, 0.02, LORA).named_parameters()))
    whole, first, last = models
    assert set(first) | set(last) == set(whole) and any(is_adapter(n) for n in last)
    for part in (first, last):
        for name, p in part.items():
            assert torch.equal(p, whole[name]), name


def test_memory_estimate_counts_gradients_and_optimizer_state_of_the_adapters_only():
    """The estimate's parameter count is what apply_lora builds, and only the adapters hold gradients and
    AdamW state (qwen7b, rank 16 on every projection: 40 M adapter parameters instead of 7.6 B)."""
    from chunkflow_pl.model.config import get_preset
    from chunkflow_pl.model.memory import estimate_training_memory

    tiny = ModelConfig(num_layers=2)
    model = Qwen2Decoder(tiny)
    apply_lora(model, LORA)
    est = estimate_training_memory(tiny, 64, 1, "32-true", lora=LORA)
    assert est.params == sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.grads == 4 * trained and est.optimizer == 2 * 4 * trained
    big = get_preset("qwen7b")
    full = estimate_training_memory(big, 32768, 1, "bf16-mixed")
    lora = estimate_training_memory(big, 32768, 1, "bf16-mixed", lora=LoraSettings(rank=16, alpha=32.0))
    assert lora.optimizer < full.optimizer / 100 and lora.activations == full.activations


LORA_LAYOUTS = {"dp2": {"dp": 2}, "pp2": {"pp": 2}, "dp_shard2": {"dp_shard": 2}}


def lora_fit(d: str, parallel, devices: int) -> dict[str, list]:
    """Two float64 AdamW steps of LoRA on the checkpoint under ``parallel``: this rank's adapters, whole."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same in 1 process as in each rank; given back below (pytest's own process)
    try:
        return _lora_fit(d, parallel, devices)
    finally:
        torch.set_num_threads(threads)


def _lora_fit(d: str, parallel, devices: int) -> dict[str, list]:
    from lightning.fabric.plugins.environments import LightningEnvironment

    from chunkflow_pl import ChunkFlowDataModule, ChunkFlowLM, ChunkFlowStrategy, DataConfig, OptimConfig

    L.seed_everything(0)
    cfg = ModelConfig.from_hf_dir(f"{d}/hf")
    data = DataConfig(kind="jsonl", path=f"{d}/train.jsonl", global_batch_size=7, shuffle=False,
                      cache_dir=f"{d}/cache")
    dm = ChunkFlowDataModule(data, chunk_size=16, vocab_size=cfg.vocab_size)
    module = ChunkFlowLM(cfg, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), loss_chunk=16,
                         pretrained=f"{d}/hf", lora=LORA)
    env = {"cluster_environment": LightningEnvironment()} if devices > 1 else {}
    strategy = ChunkFlowStrategy(parallel, chunk_k=1, **env)
    grab = Adapters()
    trainer = L.Trainer(strategy=strategy, devices=devices, accelerator="cpu", precision="64-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, max_steps=2,
                        callbacks=[grab])
    trainer.fit(module, datamodule=dm)
    return grab.out


class Adapters(L.Callback):
    """The adapters, whole (FSDP2 shards gathered), at the end of training, while the process groups live."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.out = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
                    for n, p in pl_module.model.named_parameters() if is_adapter(n)}


def _lora_layouts_worker(rank: int, d: str, ports: list[int], out: str) -> None:
    import os

    from chunkflow_pl import ParallelConfig

    results = {}
    for (name, layout), port in zip(LORA_LAYOUTS.items(), ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                          LOCAL_RANK=str(rank), RANK=str(rank))
        results[name] = lora_fit(d, ParallelConfig(**layout), 2)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))


def test_lora_trains_the_same_adapters_under_dp_pp_and_fsdp(tmp_path):
    """2 gloo ranks: dp=2, pp=2 (each stage its layers' adapters) and dp_shard=2 (FSDP2 with frozen base weights)
    give the adapters of 1 process after two float64 AdamW steps."""
    from multiproc import free_port, spawn_ranks, write_token_records

    from chunkflow_pl import ParallelConfig

    make_hf_model(tie=False, dtype=torch.float64, seed=3).save_pretrained(tmp_path / "hf")
    write_token_records(tmp_path / "train.jsonl")
    want = lora_fit(str(tmp_path), ParallelConfig(), 1)
    spawn_ranks(_lora_layouts_worker, (str(tmp_path), [free_port() for _ in LORA_LAYOUTS], str(tmp_path)),
                timeout=240, hang="LoRA training hangs under a 2-rank layout")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in LORA_LAYOUTS:
        got = {**ranks[1][name], **ranks[0][name]}  # pp: each stage holds its own layers' adapters
        assert set(got) == set(want), name
        for key, w in want.items():
            w, g = torch.tensor(w, dtype=torch.float64), torch.tensor(got[key], dtype=torch.float64)
            assert (g - w).norm() / w.norm() < 1e-10, f"{name} {key}"
