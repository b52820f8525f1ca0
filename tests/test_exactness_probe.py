"""The live exactness probe on real runs: ~1e-12 in float64, no effect on training, loud when the chunked
path is broken."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from callbacks.exactness import ExactnessError, ExactnessProbe
from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.schedule.state import StateStore
from chunkflow_pl.training.exactness import pick_sequence, sequence_tensors
from train import train

LENS = [70, 9, 33, 4, 20]  # chunk.size 16: 70 -> 5 pieces, 33 -> 3 pieces, 20 -> 2 pieces


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    g = torch.Generator().manual_seed(3)
    with (d / "data.jsonl").open("w") as f:
        for n in LENS:
            f.write(json.dumps({"input_ids": torch.randint(0, 61, (n,), generator=g).tolist()}) + "\n")
    return d


def run(data, out, *extra, callbacks=()):
    overrides = [f"output_dir={out}", "logger=none", "callbacks.progress=null", "callbacks.checkpoint=null",
                 "callbacks.exactness=null", "callbacks.throughput.peak_flops=1e9", "data=jsonl",
                 f"data.path={data / 'data.jsonl'}", f"data.cache_dir={data / 'cache'}", "data.global_batch_size=5",
                 "data.shuffle=false", "chunk.size=16", "trainer.precision=64-true", "trainer.accelerator=cpu",
                 "trainer.max_steps=2", "optim.lr=1e-2", "model.overrides.vocab_size=61",
                 "model.overrides.hidden_size=16", "model.overrides.num_layers=2", "model.overrides.num_heads=4",
                 "model.overrides.num_kv_heads=2", "model.overrides.intermediate_size=24", "model.init_std=0.2",
                 f"export.hf_dir={out / 'export'}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    res = train(cfg, callbacks=list(callbacks))
    return res, load_file(str(out / "export" / "model.safetensors"))


class GradSnapshot(L.Callback):
    """Before the probe: keeps the training step's gradients; after it (``check``): they are untouched."""

    def __init__(self, check: GradSnapshot | None = None) -> None:
        self.check, self.grads, self.checked = check, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = list(pl_module.model.parameters())
        if self.check is None:
            self.grads = [(p.grad, p.grad.clone()) for p in params]
            return
        for p, (obj, value) in zip(params, self.check.grads, strict=True):
            assert p.grad is obj and torch.equal(p.grad, value)
        self.checked += 1


def test_probe_reports_float64_rounding_and_leaves_training_unchanged(data, tmp_path):
    probe = ExactnessProbe(every_n_steps=1)
    before = GradSnapshot()
    after = GradSnapshot(check=before)
    res, with_probe = run(data, tmp_path / "on", "chunk.k=2", callbacks=[before, probe, after])
    assert after.checked == 2
    # every step probes the sequence with the most pieces: 70 tokens in 5 chunks
    assert [(r.length, r.pieces) for r in probe.results] == [(70, 5), (70, 5)]
    for r in probe.results:
        assert r.rel_diff < 1e-12, r
        assert r.grad_norm > 0
    assert float(res["trainer"].callback_metrics["probe/grad_rel_diff"]) < 1e-12
    _, without = run(data, tmp_path / "off", "chunk.k=2")
    for name, w in without.items():  # the probe changed no gradient of the training steps: same weights, bitwise
        assert torch.equal(with_probe[name], w), name


def test_probe_fails_loudly_when_the_state_gradient_is_broken(data, tmp_path, monkeypatch):
    real_add_grad = StateStore.add_grad

    def halved(self, seq, layer, which, g):  # a bug in the state-gradient path: half of it gets lost
        real_add_grad(self, seq, layer, which, g * 0.5)

    monkeypatch.setattr(StateStore, "add_grad", halved)
    with pytest.raises(ExactnessError, match=r"sequence 0 \(70 tokens in 5 chunks\).*above the tolerance 1\.0e-09"):
        run(data, tmp_path, "chunk.k=1", callbacks=[ExactnessProbe(every_n_steps=1)])


def test_probe_picks_the_split_sequence_with_most_pieces_under_the_length_cap():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 61, (n,), generator=g) for n in LENS]
    plan = build_chunk_plan(LENS, 16)
    batch = assemble_step(plan.chunks, seqs, [targets_from_labels(s) for s in seqs], LENS, list(range(5)),
                          sum(n - 1 for n in LENS), 0, len(plan.chunks))
    assert pick_sequence(batch, 10_000) == 0  # 70 tokens, 5 pieces
    assert pick_sequence(batch, 40) == 2  # 33 tokens, 3 pieces
    assert pick_sequence(batch, 32) == 4  # 20 tokens, 2 pieces
    assert pick_sequence(batch, 16) is None  # nothing split is that short
    ids, targets, pieces = sequence_tensors(batch, 2)  # rebuilt from pieces that sit in different chunks
    assert torch.equal(ids, seqs[2]) and torch.equal(targets, targets_from_labels(seqs[2]))
    assert [(p.start, p.end) for p in pieces] == [(0, 16), (16, 32), (32, 33)]
