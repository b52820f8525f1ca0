"""Typed config groups: unknown keys and wrong types fail at start, naming the key and what is accepted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from chunkflow_pl.config import ChunkConfig, ParallelConfig
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.model.config import ModelSettings, get_preset
from chunkflow_pl.plan.settings import PlanSettings
from chunkflow_pl.training.optim import OptimConfig
from chunkflow_pl.utils.typed_config import SIZE, from_dict
from train import train


@dataclass(frozen=True)
class _Example:
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    maybe: int | None = None
    pair: tuple[float, float] = (0.9, 0.95)
    tokens: int = field(default=4096, metadata=SIZE)


def test_from_dict_checks_each_annotation():
    got = from_dict(_Example, {"n": 3, "x": 2, "flag": True, "maybe": None, "pair": [1, 0.5], "tokens": "8k"}, "ex")
    assert got == _Example(n=3, x=2.0, flag=True, maybe=None, pair=(1.0, 0.5), tokens=8192)
    assert isinstance(got.x, float) and isinstance(got.pair, tuple)
    bad = [({"n": "abc"}, r"ex\.n='abc' must be an integer"), ({"n": True}, r"ex\.n=True must be an integer"),
           ({"n": 1.5}, r"ex\.n=1\.5 must be an integer"), ({"x": "fast"}, r"ex\.x='fast' must be a number"),
           ({"flag": "yes"}, r"ex\.flag='yes' must be true or false"), ({"name": 3}, r"ex\.name=3 must be a string"),
           ({"maybe": "x"}, r"ex\.maybe='x' must be an integer or null"),
           ({"pair": [1, 2, 3]}, r"ex\.pair=\[1, 2, 3\] must be a list of 2"),
           ({"tokens": "8kb"}, r"ex\.tokens='8kb' is not a size")]
    for d, msg in bad:
        with pytest.raises(ValueError, match=msg):
            from_dict(_Example, d, "ex")
    with pytest.raises(ValueError, match=r"unknown key ex\.sise; accepted keys: flag, maybe, n, name, pair, tokens, x"):
        from_dict(_Example, {"sise": 1}, "ex")


def test_from_dict_takes_an_omegaconf_node_with_interpolations():
    node = OmegaConf.create({"base": 7, "ex": {"n": "${base}", "tokens": "1k"}})
    assert from_dict(_Example, node.ex, "ex") == _Example(n=7, tokens=1024)


def test_every_group_uses_the_one_helper():
    assert ChunkConfig.from_dict({"size": "32k", "k": 2, "offload_state": True}) == ChunkConfig(32768, 2, True)
    assert ParallelConfig.from_dict({"dp": 2, "pp": 4}).world_size == 8
    with pytest.raises(ValueError, match=r"unknown key chunk\.sise; accepted keys: k, layer_checkpoint, offload_state, "
                                         r"size"):
        ChunkConfig.from_dict({"sise": "8k"})
    with pytest.raises(ValueError, match=r"chunk\.k='abc' must be an integer"):
        ChunkConfig.from_dict({"k": "abc"})
    with pytest.raises(ValueError, match=r"chunk\.k=0 must be >= 1"):
        ChunkConfig.from_dict({"k": 0})
    for bad in ({"dp": 0}, {"pp": -1}, {"dp": 1.5}):
        with pytest.raises(ValueError, match=r"parallel\.(dp|pp)=.* must be a positive integer|must be an integer"):
            ParallelConfig.from_dict(bad)
    with pytest.raises(ValueError, match=r"unknown key parallel\.tp"):
        ParallelConfig.from_dict({"tp": 2})
    with pytest.raises(ValueError, match=r"optim\.lr='big' must be a number"):
        OptimConfig.from_dict({"lr": "big"})
    with pytest.raises(ValueError, match=r"unknown key optim\.beta1"):
        OptimConfig.from_dict({"beta1": 0.9})
    with pytest.raises(ValueError, match=r"data\.global_batch_size='x' must be an integer"):
        DataConfig.from_dict({"global_batch_size": "x"})
    with pytest.raises(ValueError, match=r"unknown key model\.overrides\.hiden_size; accepted keys: .*hidden_size"):
        get_preset("tiny", hiden_size=64)
    with pytest.raises(ValueError, match=r"model\.overrides\.num_layers='two' must be an integer"):
        get_preset("tiny", num_layers="two")
    assert get_preset("tiny", max_position_embeddings="64k").max_position_embeddings == 65536
    with pytest.raises(ValueError, match=r"unknown key model\.foo; accepted keys: attention, init_std, lora, "
                                         r"loss_chunk, overrides, preset, pretrained"):
        ModelSettings.from_dict({"foo": 1})


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={tmp_path}", "logger=none", "callbacks.checkpoint=null",
                                           "callbacks.progress=null", "trainer.accelerator=cpu", *overrides])


@pytest.mark.parametrize("override,message", [
    ("+chunk.sise=8k", r"unknown key chunk\.sise; accepted keys: k, layer_checkpoint, offload_state, size"),
    ("chunk.k=abc", r"chunk\.k='abc' must be an integer"),
    ("+model.foo=1", r"unknown key model\.foo; accepted keys: .*preset"),
    ("+model.overrides.foo=1", r"unknown key model\.overrides\.foo; accepted keys: .*num_layers"),
    ("+parallel.tp=2", r"unknown key parallel\.tp; accepted keys: auto, check_messages, check_plan, "
                       r"collective_timeout, dp, dp_replicate, dp_shard, grad_reduce, pp, reshard_after_forward, "
                       r"split_backward"),
    ("+trainer.foo=1", r"unknown key trainer\.foo; accepted keys: .*max_steps"),
    ("trainer.max_steps=many", r"trainer\.max_steps='many' must be an integer"),
    ("+trainer.strategy=ddp", r"trainer\.strategy is set by train\.py"),
    # the plan group is typed even when chunk.size is not auto (the planner is not asked)
    ("+plan.foo=1", r"unknown key plan\.foo; accepted keys: chunk_sizes, device_memory, devices, devices_per_node, "
                    r"flops_per_s, inter_node_gbps, intra_node_gbps, ks, memory_budget, num_batches, overhead$"),
    ("plan.ks=[1,chain,abc]", r"plan\.ks\[2\]='abc' must be an integer >= 1 or chain"),
    ("plan.ks=[]", r"plan\.ks=\[\] lists no k"),
    ("plan.chunk_sizes=[]", r"plan\.chunk_sizes=\[\] lists no chunk size"),
    ("plan.chunk_sizes=[4k,big]", r"plan\.chunk_sizes\[1\]='big' is not a size"),
    ("plan.num_batches=0", r"plan\.num_batches=0 must be >= 1"),
    ("plan.flops_per_s=-1", r"plan\.flops_per_s=-1\.0 must be a positive number"),
    ("plan.flops_per_s=fast", r"plan\.flops_per_s='fast' must be a number or null"),
    ("plan.memory_budget=0", r"plan\.memory_budget=0 must be positive"),
    ("plan.overhead=-1", r"plan\.overhead=-1 must be >= 0"),
])
def test_typos_and_bad_values_fail_before_anything_runs(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(_cfg(tmp_path, override))


def test_damaged_checkpoint_names_the_file(tmp_path):
    """A checkpoint cut short (a run killed while writing it, a full disk) fails in one line naming it."""
    small = ["data.num_sequences=16", "data.max_len=64", "data.global_batch_size=4", "model.overrides.num_layers=1"]
    out = train(_cfg(tmp_path / "a", "trainer.max_steps=1", *small))
    good = tmp_path / "good.ckpt"
    out["trainer"].save_checkpoint(good)
    damages = {"shard": lambda d: _truncate(next(d.glob("*.distcp"))), "meta": lambda d: _truncate(d / "meta.pt"),
               "index": lambda d: (d / ".metadata").unlink()}
    for name, damage in damages.items():
        bad = tmp_path / f"{name}.ckpt"
        shutil.copytree(good, bad)
        damage(bad)
        with pytest.raises(ValueError, match=rf"ckpt_path={bad}\b"):
            train(_cfg(tmp_path / name, "trainer.max_steps=2", f"ckpt_path={bad}", *small))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing\.ckpt"):
        train(_cfg(tmp_path / "c", f"ckpt_path={tmp_path / 'missing.ckpt'}", *small))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_command_line_typo_exits_1_with_the_key_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "+trainer.foo=1", "logger=none", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "unknown key trainer.foo" in r.stderr and "Traceback" not in r.stderr


def test_plan_settings_keep_nulls_and_parse_units():
    got = PlanSettings.from_dict({"memory_budget": "1MiB", "overhead": 0, "chunk_sizes": ["2k", 512],
                                  "ks": [1, "chain"], "flops_per_s": 1e11})
    assert (got.memory_budget, got.overhead, got.chunk_sizes, got.ks) == (2**20, 0, (2048, 512), (1, "chain"))
    assert PlanSettings.from_dict({}) == PlanSettings() and PlanSettings().memory_budget is None


def test_synthetic_only_keys_with_file_data_are_refused_not_ignored(tmp_path):
    for key in ("max_len=8k", "min_len=4", "num_sequences=10"):
        with pytest.raises(ValueError, match=rf"data\.{key.split('=')[0]} applies only to data\.kind=synthetic"):
            train(_cfg(tmp_path, "data=jsonl", f"data.path={tmp_path / 'missing.jsonl'}", f"+data.{key}"))
    assert DataConfig.from_dict({"kind": "synthetic"}).max_len == 8192  # defaults stay for synthetic data


def test_sharding_keys_are_typed_and_checked_before_anything_starts():
    p = ParallelConfig.from_dict({"dp_replicate": 2, "dp_shard": 2, "pp": 2})
    assert (p.data_parallel, p.world_size) == (4, 8)
    assert ParallelConfig.from_dict({"dp": 3}).data_parallel == 3  # dp alone: replicate-only, as before
    for bad, msg in (({"dp": 2, "dp_shard": 2}, r"parallel\.dp means dp_replicate alone"),
                     ({"dp_shard": 0}, r"parallel\.dp_shard=0 must be a positive integer"),
                     ({"grad_reduce": "sometimes"}, r"parallel\.grad_reduce='sometimes' must be one of"),
                     ({"grad_reduce": "every_backward", "pp": 2}, r"every_backward with parallel\.pp > 1"),
                     ({"reshard_after_forward": True}, r"reshard_after_forward=True: only false")):
        with pytest.raises(ValueError, match=msg):
            ParallelConfig.from_dict(bad)
    with pytest.raises(ValueError, match=r"chunk\.layer_checkpoint='some' must be one of none, full"):
        ChunkConfig.from_dict({"layer_checkpoint": "some"})
