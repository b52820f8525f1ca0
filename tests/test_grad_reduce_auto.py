"""``parallel.grad_reduce=auto`` (the default): the layout planner's rule for one layout, decided at start.

``last_backward`` (one reduce per step: always the faster, ``plan/layout.py`` prices it so) unless its per-rank
estimate does not fit the device, then ``every_backward`` (no unsharded gradient held across backwards). The
ranks' agreement is tested in ``tests/test_sharding.py`` (2 gloo ranks, picks that differ).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from chunkflow_pl.config import ParallelConfig
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.model.memory import Sharding
from chunkflow_pl.strategy.memory_check import MemoryRequest, estimate, pick_grad_reduce, sharding_of

GiB = 2**30


def _request(pp: int = 1, dp_shard: int = 8) -> MemoryRequest:
    return MemoryRequest(get_preset("qwen7b"), 32768, 1, "bf16-mixed", "adamw", 4096, 32768, pp,
                         layer_checkpoint="full", sharding=Sharding(dp_shard, 1, "last_backward"))


def _total(req: MemoryRequest, mode: str) -> int:
    return estimate(replace(req, sharding=replace(req.sharding, grad_reduce=mode))).total


def test_auto_is_the_default_and_keeps_last_backward_where_it_fits():
    assert ParallelConfig().grad_reduce == "auto"
    assert sharding_of(ParallelConfig(dp_shard=2)).grad_reduce == "last_backward"  # until the memory check picks
    req = _request()
    last, every = _total(req, "last_backward"), _total(req, "every_backward")
    assert every < last - GiB  # Qwen2.5-7B over 8 shards: the unsharded fp32 gradient is the difference
    assert pick_grad_reduce(req, last) == "last_backward"
    assert pick_grad_reduce(req, 10**15) == "last_backward"


def test_auto_takes_every_backward_when_only_it_fits():
    req = _request()
    last, every = _total(req, "last_backward"), _total(req, "every_backward")
    assert pick_grad_reduce(req, (last + every) // 2) == "every_backward"
    assert pick_grad_reduce(req, every // 2) == "every_backward"  # neither fits: the smaller, refused with its numbers


@pytest.mark.parametrize("kw", [{"pp": 2}, {"dp_shard": 1}])
def test_auto_is_last_backward_without_sharding_or_with_a_pipeline(kw):
    """pp > 1 refuses every_backward (ranks of a stage run different schedules); unsharded it saves nothing."""
    assert pick_grad_reduce(_request(**kw), 1) == "last_backward"


def test_a_bad_value_names_auto_among_the_choices():
    with pytest.raises(ValueError, match="last_backward, every_backward, auto"):
        ParallelConfig(grad_reduce="sometimes")
