"""The planners consider split backward and virtual stages wherever the runtime runs them, and only there (issue 24
item 3): the report, ``parallel=auto`` and ``chunk.size=auto`` on the tiny model (4 layers), planning only."""

from __future__ import annotations

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

import chunkflow_pl.plan.layout as layout_module
from chunkflow_pl.plan.__main__ import main as plan_main
from chunkflow_pl.plan.auto import resolve_auto_chunk, resolve_auto_layout
from chunkflow_pl.plan.layout import plan_layout
from chunkflow_pl.plan.runnable import refusal
from chunkflow_pl.plan.settings import model_config, plan_inputs

FAST = ["plan.flops_per_s=1e11", "plan.overhead=0", "data.num_sequences=64", "plan.num_batches=2",
        "plan.chunk_sizes=[1k,2k]", "plan.ks=[1]"]
AUTO = ["parallel=auto", "plan.device_memory=1GiB", *FAST]


def _picked(out):
    """(pp, split_backward, virtual_stages) of a resolved config; a config without the keys means false / 1."""
    return out.parallel.pp, out.parallel.get("split_backward", False), out.parallel.get("virtual_stages", 1)


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_report_on_a_pipeline_considers_split_and_virtual_and_names_the_pick(capsys):
    result = plan_main(["parallel.pp=2", "plan.memory_budget=1GiB", *FAST])
    assert {(r.split_backward, r.virtual) for r in result.rows} == {(False, 1), (True, 1), (False, 2), (True, 2)}
    best = result.best
    assert (best.split_backward, best.virtual) == (True, 2)  # tiny, pp=2: both shorten the step here
    assert result.override().endswith(" parallel.split_backward=true parallel.virtual_stages=2")
    assert f"override: {result.override()}" in capsys.readouterr().out


@pytest.mark.parametrize("overrides,splits,virtuals", [
    (["parallel.pp=2"], (False, True), (1, 2)),
    (["parallel.pp=2", "chunk.layer_checkpoint=full"], (False,), (1, 2)),
    (["parallel.pp=2", "model.lora.rank=8"], (False,), (1, 2)),
    (["parallel.pp=2", "parallel.dp=2", "trainer.precision=bf16-mixed"], (False,), (1,)),
    (["parallel.pp=2", "parallel.dp=2"], (False, True), (1,)),
    (["parallel.pp=1"], (False, True), (1,)),  # split rows are not planned at pp=1 (core.py): nothing to fill
], ids=["pp2", "layer-checkpoint-full", "lora", "dp-bf16-mixed", "dp-32-true", "pp1"])
def test_report_candidates_are_what_the_runtime_runs(overrides, splits, virtuals):
    spec = plan_inputs(_cfg([*overrides, "plan.memory_budget=1GiB", *FAST])).spec
    assert (spec.split_backward, spec.virtual) == (splits, virtuals)


def test_parallel_auto_writes_the_picked_split_and_virtual_and_never_a_refused_one(monkeypatch):
    cfg = _cfg([*AUTO, "plan.devices=2"])
    out = resolve_auto_layout(cfg, model_config(cfg.model))  # tiny on 2 cards: pp=2 with both is fastest
    assert _picked(out) == (2, True, 2)
    lora = _cfg([*AUTO, "plan.devices=2", "model.lora.rank=8"])
    out = resolve_auto_layout(lora, model_config(lora.model))
    assert _picked(out) == (2, False, 2)

    # 4 cards in bf16-mixed: unrestricted, the fastest is pp=2 x dp_shard=2 split and interleaved, which the
    # runtime refuses twice over (split with dp under bf16-mixed, v > 1 with dp)
    cfg = _cfg([*AUTO, "plan.devices=4", "trainer.precision=bf16-mixed"])
    inputs = plan_inputs(cfg)
    result = plan_layout(inputs.model, inputs.spec, inputs.cluster, inputs.sample, inputs.epoch)
    for r in result.rows:
        lay = r.layout
        assert refusal(lay.split_backward, lay.virtual, pp=lay.pp, data_parallel=lay.dp, num_layers=4,
                       layer_checkpoint=lay.layer_checkpoint, precision="bf16-mixed") is None, lay
    out = resolve_auto_layout(cfg, model_config(cfg.model))
    assert out.parallel.dp_shard * out.parallel.dp_replicate > 1
    assert _picked(out)[1:] == (False, 1)
    monkeypatch.setattr(layout_module, "refusal", lambda *a, **k: None)
    free = plan_layout(inputs.model, inputs.spec, inputs.cluster, inputs.sample, inputs.epoch).best.layout
    assert free.dp > 1 and free.split_backward and free.virtual == 2
    with pytest.raises(ValueError, match=r"parallel\.virtual_stages=2 with parallel=auto"):
        plan_inputs(_cfg([*AUTO, "plan.devices=2", "++parallel.virtual_stages=2"]))


def test_chunk_size_auto_keeps_the_users_split_and_virtual():
    base = ["chunk.size=auto", "chunk.k=auto", "parallel.pp=2", "plan.memory_budget=1GiB", *FAST]
    cfg = _cfg([*base, "++parallel.split_backward=false", "++parallel.virtual_stages=2"])
    spec = plan_inputs(cfg, fixed_parallel=True).spec
    assert (spec.split_backward, spec.virtual) == ((False,), (2,))  # planned for them, and only them
    out = resolve_auto_chunk(cfg, model_config(cfg.model))
    assert out.chunk.size in (1024, 2048) and out.chunk.k == 1
    assert (out.parallel.split_backward, out.parallel.virtual_stages) == (False, 2)  # split would be faster: kept off
    plain = _cfg(base)  # a config without the keys: the defaults
    assert (plan_inputs(plain, fixed_parallel=True).spec.split_backward, plan_inputs(
        plain, fixed_parallel=True).spec.virtual) == ((False,), (1,))
    full = _cfg([*base, "chunk.layer_checkpoint=full", "++parallel.split_backward=true"])
    with pytest.raises(ValueError, match=r"parallel\.split_backward=true with chunk\.layer_checkpoint=full"):
        resolve_auto_chunk(full, model_config(full.model))
