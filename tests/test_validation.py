"""Validation: forward-only through the step runner, exact against transformers, memory set by the chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.schedule.evaluation import EvalSums, is_forward_only, plan_forward
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.pipeline_actions import Action, Op
from chunkflow_pl.schedule.runner import StepRunner

LENS = [5, 40, 13, 1, 320, 33, 16, 17]
EDGES = [8, 32, 100]  # buckets [0, 8), [8, 32), [32, 100), >= 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(tie=False, dtype=torch.float64, seed=3)
    hf.save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(model, d, cfg)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    labels = [s.clone() for s in seqs]
    labels[4][:50] = -100  # an unsupervised prompt inside a split sequence
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    # Reference: transformers on each whole sequence; the loss at slot t counts at position t + 1.
    loss = torch.zeros(len(EDGES) + 1, dtype=torch.float64)
    tokens = torch.zeros(len(EDGES) + 1, dtype=torch.float64)
    with torch.no_grad():
        for s, t in zip(seqs, targets):
            ce = F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="none")
            b = torch.bucketize(torch.arange(1, len(s) + 1), torch.tensor(EDGES), right=True)
            loss.index_add_(0, b, ce)
            tokens.index_add_(0, b, (t != -100).double())
    return model, seqs, targets, loss, tokens


def val_sums(model, seqs, targets, chunk_size, offload=False) -> tuple[EvalSums, object]:
    plan = build_chunk_plan([len(s) for s in seqs], chunk_size)
    n_label = sum(int((t != -100).sum()) for t in targets)
    batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))), n_label, 0,
                          len(plan.chunks))
    sums = EvalSums(EDGES)
    run = StepRunner(model.cfg, 1, "cpu", offload_state=offload).evaluate(model, batch, sums)
    return sums, run


@pytest.mark.parametrize("chunk_size,offload", [(16, False), (24, True), (64, False), (320, False)])
def test_val_loss_equals_transformers_for_any_chunk_size(setup, chunk_size, offload):
    model, seqs, targets, ref_loss, ref_tokens = setup
    sums, run = val_sums(model, seqs, targets, chunk_size, offload)
    got = float(sums.buckets.loss_sum.sum() / sums.buckets.tokens.sum())
    want = float(ref_loss.sum() / ref_tokens.sum())
    assert abs(got - want) / want < 1e-10
    assert sums.buckets.tokens.tolist() == ref_tokens.tolist()  # every supervised token counted once, by position
    assert torch.allclose(sums.buckets.loss_sum, ref_loss, rtol=1e-10, atol=0)
    assert sums.curve.tokens.sum() == ref_tokens.sum() and torch.allclose(sums.curve.loss_sum.sum(), ref_loss.sum(),
                                                                          rtol=1e-10, atol=0)
    assert run.stats.tokens == sum(LENS) and run.stats.max_live_activations == 0
    assert all(p.grad is None for p in model.parameters())  # forward only: no gradient anywhere


def test_the_plan_is_forward_only_and_the_executor_refuses_anything_else(setup):
    model, seqs, targets, *_ = setup
    plan = build_chunk_plan([len(s) for s in seqs], 16)
    fwd = plan_forward(plan.chunks, pp=2)
    assert is_forward_only(fwd) and fwd.caps == (0, 0)
    assert [str(a) for a in fwd.stages[1][:3]] == ["<A0", "F0(drop)", "<A1"]
    batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))), 1, 0,
                          len(plan.chunks))
    ex = ChunkExecutor(model, batch, torch.device("cpu"), evaluation=EvalSums(EDGES))
    with pytest.raises(ValueError, match="forward-only"):
        ex.run([Action(Op.FORWARD, 0), Action(Op.BACKWARD, 0)])


CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
C = 128


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the largest tensor any op computes (views and the state store's own buffers excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket is not torch.ops.aten.empty:
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def validation_memory(lens: list[int]) -> tuple[int, int]:
    """Largest computed tensor and peak K/V state of validating sequences ``lens`` in chunks of C."""
    torch.manual_seed(0)
    model = Qwen2Decoder(CFG, loss_chunk=64)
    seqs = [torch.randint(0, 64, (n,)) for n in lens]
    plan = build_chunk_plan(lens, C)
    batch = assemble_step(plan.chunks, seqs, [targets_from_labels(s) for s in seqs], lens, list(range(len(lens))),
                          1, 0, len(plan.chunks))
    with LargestTensor() as mode:
        run = StepRunner(CFG, 1, "cpu").evaluate(model, batch, EvalSums([C]))
    return mode.largest, run.stats.peak_state_bytes


def test_validation_memory_is_set_by_the_chunk_and_state_is_freed_per_sequence():
    kv_bytes_per_token = CFG.num_layers * 2 * CFG.num_kv_heads * CFG.head_dim * 4
    short, state_short = validation_memory([4 * C])
    long, state_long = validation_memory([16 * C])
    assert long == short  # nothing computed grows with the sequence (no chunk x prefix scores, no prefix copy)
    assert state_short == kv_bytes_per_token * 4 * C and state_long == kv_bytes_per_token * 16 * C
    # Two long sequences one after the other: the first's state is gone before the second's is written.
    _, state_two = validation_memory([16 * C, 16 * C])
    assert state_two == state_long


# ---- configuration and validation data ---------------------------------------------------------------------


def test_validation_keys_are_typed_and_refused_naming_the_key(tmp_path):
    from chunkflow_pl.data.config import DataConfig
    from train import trainer_options

    cases = [({"val_fraction": "abc"}, "data.val_fraction='abc' must be a number"),
             ({"val_fraction": 1.0}, "data.val_fraction=1.0 must be between 0 and 1"),
             ({"val_position_buckets": [16, 4]}, r"data.val_position_buckets=\[16, 4\] must be strictly increasing"),
             ({"val_position_buckets": ["4k", "x"]}, r"data.val_position_buckets\[1\]='x' is not a size"),
             ({"val_path": "v.jsonl"}, "data.val_path needs record files"),
             ({"kind": "jsonl", "path": "a.jsonl", "val_path": "v.jsonl", "val_fraction": 0.1}, "both set")]
    for d, msg in cases:
        with pytest.raises(ValueError, match=msg):
            DataConfig.from_dict(d)
    assert DataConfig.from_dict({"val_position_buckets": ["4k", "1m"]}).val_position_buckets == [4096, 1024**2]
    from omegaconf import OmegaConf

    for key, value in (("val_check_interval", 0), ("val_check_interval", 1.5), ("check_val_every_n_epoch", 0)):
        with pytest.raises(ValueError, match=f"trainer.{key}"):
            trainer_options(OmegaConf.create({key: value}))


def test_held_out_share_is_fixed_and_disjoint():
    from chunkflow_pl.data.holdout import holdout_split

    train, val = holdout_split(100, 0.05, seed=1)
    assert len(val) == 5 and len(train) == 95 and not set(train) & set(val)
    again = holdout_split(100, 0.05, seed=1)
    assert (again[1] == val).all() and (holdout_split(100, 0.05, seed=2)[1] != val).any()


def test_a_validation_file_with_bad_records_follows_on_bad_record(tmp_path):
    from chunkflow_pl.data.config import DataConfig
    from chunkflow_pl.data.datamodule import make_stores
    from chunkflow_pl.data.sources import DataError

    (tmp_path / "train.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    (tmp_path / "val.jsonl").write_text('{"input_ids": [1, 2, 3, 4]}\n{"input_ids": [1, \n{"input_ids": [5, 6]}\n')
    common = {"kind": "jsonl", "path": str(tmp_path / "train.jsonl"), "val_path": str(tmp_path / "val.jsonl"),
              "cache_dir": str(tmp_path / "cache"), "tokenize_workers": 0}
    with pytest.raises(DataError, match=r"val\.jsonl:2"):
        make_stores(DataConfig(**common), vocab_size=97)
    _, val = make_stores(DataConfig(**common, on_bad_record="skip"), vocab_size=97)
    assert list(val.lengths) == [4, 2] and val.skipped_records == 1
