"""Head-aware layer cut (``schedule/balance_layers.py``): optimal, deterministic, and it evens the stages out."""

from __future__ import annotations

import itertools

import pytest

from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.model.flops import ModelFlops
from chunkflow_pl.schedule.balance_layers import balance_layers
from chunkflow_pl.schedule.cost import CostModel, even_stage_layers


def block_costs(cfg, layers, tokens: int, prefix: int = 0) -> list[float]:
    """Forward FLOPs per block of one chunk, from model/flops.py directly."""
    return [ModelFlops.from_config(cfg, layers=n, head=b == len(layers) - 1).forward([(tokens, prefix)])
            for b, n in enumerate(layers)]


def compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        yield tuple(b - a for a, b in zip((0,) + cuts, cuts + (n,)))


@pytest.mark.parametrize("layers", [6, 8, 11])
@pytest.mark.parametrize("blocks", [2, 3, 4, 5])
@pytest.mark.parametrize("tokens", [512, 8192, 32768])
def test_cut_minimises_the_slowest_block_over_every_cut(layers: int, blocks: int, tokens: int) -> None:
    cfg = get_preset("qwen7b", num_layers=layers)
    cut = balance_layers(cfg, blocks, tokens)
    assert sum(cut) == layers and min(cut) >= 1 and len(cut) == blocks
    best = min(max(block_costs(cfg, c, tokens)) for c in compositions(layers, blocks))
    assert max(block_costs(cfg, cut, tokens)) == pytest.approx(best, rel=1e-12)


def test_qwen7b_at_eight_blocks_moves_layers_off_the_head_block() -> None:
    cfg = get_preset("qwen7b")  # 28 layers, V = 152K
    even = even_stage_layers(28, 8)
    cut = balance_layers(cfg, 8, 8192)
    assert cut[-1] < even[-1] and cut == balance_layers(cfg, 8, 8192)  # deterministic
    ratio = lambda c: max(block_costs(cfg, c, 8192)) / min(block_costs(cfg, c, 8192))  # noqa: E731
    assert ratio(cut) < ratio(even)
    # the cost model takes it as is: the last stage's forward is no longer the slowest by the head's share
    cost = CostModel.from_model(cfg, 8, stage_layers=cut)
    times = [cost.forward_time(s, [Segment(0, 0, 8192)]) for s in range(8)]
    assert max(times) < max(CostModel.from_model(cfg, 8).forward_time(s, [Segment(0, 0, 8192)]) for s in range(8))


def test_one_block_and_bad_arguments() -> None:
    cfg = get_preset("qwen7b", num_layers=4)
    assert balance_layers(cfg, 1, 100) == (4,)
    with pytest.raises(ValueError, match="blocks=5"):
        balance_layers(cfg, 5, 100)
    with pytest.raises(ValueError, match="tokens=0"):
        balance_layers(cfg, 2, 0)


def rank_costs(cfg, layers, ranks: int, tokens: int) -> list[float]:
    per_block = block_costs(cfg, layers, tokens)
    return [sum(per_block[b] for b in range(r, len(layers), ranks)) for r in range(ranks)]


@pytest.mark.parametrize(("layers", "ranks", "v"), [(8, 2, 2), (9, 3, 2), (11, 2, 3), (12, 3, 3), (10, 4, 2)])
@pytest.mark.parametrize("tokens", [512, 8192])
def test_virtual_cut_minimises_the_busiest_rank_over_every_cut(layers: int, ranks: int, v: int, tokens: int) -> None:
    cfg = get_preset("qwen7b", num_layers=layers)
    cut = balance_layers(cfg, ranks * v, tokens, ranks=ranks)
    assert sum(cut) == layers and min(cut) >= 1 and len(cut) == ranks * v
    best = min(max(rank_costs(cfg, c, ranks, tokens)) for c in compositions(layers, ranks * v))
    assert max(rank_costs(cfg, cut, ranks, tokens)) == pytest.approx(best, rel=1e-12)
    assert all(max(cut[r::ranks]) - min(cut[r::ranks]) <= 1 for r in range(ranks))  # a rank's blocks alike


def test_qwen7b_with_two_blocks_per_rank_evens_ranks_not_blocks() -> None:
    cfg = get_preset("qwen7b")
    per_block = balance_layers(cfg, 16, 8192)
    per_rank = balance_layers(cfg, 16, 8192, ranks=8)
    assert max(rank_costs(cfg, per_rank, 8, 8192)) < max(rank_costs(cfg, per_block, 8, 8192))
    assert balance_layers(cfg, 8, 8192, ranks=8) == balance_layers(cfg, 8, 8192)  # v = 1: the same search
    with pytest.raises(ValueError, match="multiple of ranks"):
        balance_layers(cfg, 16, 8192, ranks=3)
