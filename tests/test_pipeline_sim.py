"""Cost model, simulator and timeline drawing of pipeline plans (pure python + matplotlib)."""

from __future__ import annotations

import pytest

from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.schedule.cost import CostModel, MeasuredCost, even_stage_layers
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.scheduler import plan_pipeline
from chunkflow_pl.schedule.simulator import lower_bound, simulate
from chunkflow_pl.schedule.timeline import COLORS, TimedEvent, draw_timeline, timeline_stats

CHAIN = [[Segment(0, 0, 4)], [Segment(0, 4, 8)], [Segment(0, 8, 12)]]  # one sequence of 12 tokens in 3 chunks


def test_message_latency_lies_on_the_critical_path_of_a_single_chunk() -> None:
    chunks = [[Segment(0, 0, 4)]]
    cost = CostModel.uniform(2, per_token=0.25, per_pair=0.0, comm_latency=0.5, comm_per_token=0.125)
    plan = plan_pipeline(chunks, [4], pp=2, k=1, cost=cost)
    r = simulate(plan, chunks, [4], cost)
    # F on stage 0 (1), message (0.5 + 4 * 0.125), F + B on stage 1 (3), gradient message (1), B on stage 0 (2)
    assert r.step_time == 8.0
    assert [(e.stage, e.op, e.start, e.end) for e in r.events] == [
        (0, "forward", 0.0, 1.0), (0, "backward", 6.0, 8.0), (1, "forward", 2.0, 3.0), (1, "backward", 3.0, 5.0)]
    assert r.bubble == (5 / 8, 5 / 8)


def test_attention_term_grows_with_the_prefix() -> None:
    cost = CostModel.uniform(1, per_token=1.0, per_pair=0.5)
    times = [cost.op_time(Op.FORWARD, 0, c, seg) for c, seg in enumerate(CHAIN)]
    # 4 tokens each; pairs 10, 26, 42 (prefix 0, 4, 8): 4 * start + 4 * 5 / 2
    assert times == [4 + 5.0, 4 + 13.0, 4 + 21.0]
    assert cost.op_time(Op.BACKWARD, 0, 2, CHAIN[2]) == 2 * times[2]
    assert cost.op_time(Op.RECOMPUTE, 0, 2, CHAIN[2]) == times[2]


def test_memory_peaks_of_a_chain_with_k1() -> None:
    chunks = CHAIN + [[Segment(1, 0, 3)]]
    lens = [12, 3]
    cost = CostModel.uniform(3, per_token=0.25, per_pair=0.0)
    plan = plan_pipeline(chunks, lens, pp=3, k=1, cost=cost)
    r = simulate(plan, chunks, lens, cost)
    assert r.peak_live == (2, 2, 1)  # stage 0 and 1 also hold standalone chunk 3 while the chain drains
    assert r.peak_boundary_tokens == (0, 8, 8)  # two dropped 4-token inputs held; stage 0 keeps token ids
    assert r.peak_state_tokens == (8, 8, 8)  # keys/values of the two continued pieces, on every stage
    busiest, path = lower_bound(plan, chunks, lens, cost)
    assert busiest == 3.75 + 2 + 2 * 3.75  # any stage: forwards of 1, 1, 1, 0.75; 2 recomputes; backwards
    # critical path: F0 F1 F2 on stage 0 and F2 on stages 1, 2 (5), then the chain's backward wave, 3
    # backwards of 2 through 3 stages, pipelined: 5 + 2 * (3 + 3 - 1) (recomputes run off the path)
    assert path == 15.0
    assert r.step_time >= max(busiest, path)


def test_from_model_splits_layers_and_puts_the_head_on_the_last_stage() -> None:
    cfg = get_preset("qwen7b")
    assert even_stage_layers(28, 8) == (4, 4, 4, 4, 3, 3, 3, 3)
    whole = CostModel.from_model(cfg, 1, link_bytes_per_s=None)
    split = CostModel.from_model(cfg, 4, link_bytes_per_s=None)
    assert sum(split.per_token) == pytest.approx(whole.per_token[0], rel=1e-12)  # same work, divided
    assert sum(split.per_pair) == pytest.approx(whole.per_pair[0], rel=1e-12)
    assert split.per_token[3] > split.per_token[0]  # 7 layers each, plus the vocabulary head on the last
    assert split.per_pair[3] == split.per_pair[0]
    assert split.comm_time(1000) == 0.0
    linked = CostModel.from_model(cfg, 4, link_bytes_per_s=1e9, latency_s=1e-5)
    assert linked.comm_time(1000) == pytest.approx(1e-5 + 1000 * cfg.hidden_size * 2 / 1e9)
    with pytest.raises(ValueError, match="stage_layers"):
        CostModel.from_model(cfg, 2, stage_layers=(20, 7))
    with pytest.raises(ValueError, match="between 1 and the number of layers"):
        even_stage_layers(4, 5)


def _kv_only_skips(cfg, segments, flops_per_s: float) -> float:
    """Seconds a dropped (kv_only) last-stage forward skips, counted from the config: the last layer's
    q_proj, o_proj, MLP and attention pairs, and the LM head (k_proj, v_proj and the earlier layers run)."""
    d, q, f = cfg.hidden_size, cfg.num_heads * (cfg.hidden_size // cfg.num_heads), cfg.intermediate_size
    tokens = sum(seg.end - seg.start for seg in segments)
    pairs = sum((seg.end - seg.start) * seg.start + (seg.end - seg.start) * (seg.end - seg.start + 1) // 2
                for seg in segments)
    per_token = 2 * d * q + 2 * q * d + 3 * 2 * d * f + 2 * cfg.vocab_size * d
    return (per_token * tokens + 4 * q * pairs) / flops_per_s


@pytest.mark.parametrize("pp, stage_layers", [(4, None), (1, None), (2, (27, 1))])
def test_dropped_forward_on_the_last_stage_skips_what_kv_only_skips(pp, stage_layers) -> None:
    cfg = get_preset("qwen7b")
    cost = CostModel.from_model(cfg, pp, stage_layers=stage_layers, flops_per_s=1e12, link_bytes_per_s=None)
    chunk = [Segment(0, 1000, 1500), Segment(1, 0, 300)]  # a continued piece (prefix 1000) and a whole sequence
    last = pp - 1
    kept = cost.op_time(Op.FORWARD, last, 0, chunk, keep=True)
    dropped = cost.op_time(Op.FORWARD, last, 0, chunk, keep=False)
    assert kept - dropped == pytest.approx(_kv_only_skips(cfg, chunk, 1e12), rel=1e-12)
    if stage_layers == (27, 1):  # a one-layer last stage computes its k/v projections and nothing else
        d_kv = cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)
        assert dropped == pytest.approx(2 * 2 * cfg.hidden_size * d_kv * 800 / 1e12, rel=1e-12)
    # the recompute and the backward redo the whole stage with autograd (and the loss): unchanged
    assert cost.op_time(Op.RECOMPUTE, last, 0, chunk) == kept
    assert cost.op_time(Op.BACKWARD, last, 0, chunk) == 2 * kept
    for s in range(last):  # a middle stage must send its output: its dropped forward is a full one
        assert cost.op_time(Op.FORWARD, s, 0, chunk, keep=False) == cost.op_time(Op.FORWARD, s, 0, chunk)


def test_simulator_and_lower_bound_price_dropped_forwards_as_kv_only() -> None:
    cfg = get_preset("qwen7b")
    chunks = [[Segment(0, 0, 4096)], [Segment(0, 4096, 8192)]]  # a chain of 2, k=1: chunk 0 dropped
    cost = CostModel.from_model(cfg, 2, flops_per_s=1e12, link_bytes_per_s=None)
    plan = plan_pipeline(chunks, [8192], pp=2, k=1, cost=cost)
    r = simulate(plan, chunks, [8192], cost)
    f0 = {e.stage: e.end - e.start for e in r.events if e.op == "forward" and e.chunk == 0}
    full = cost.op_time(Op.FORWARD, 1, 0, chunks[0])
    assert f0[1] == pytest.approx(full - _kv_only_skips(cfg, chunks[0], 1e12), rel=1e-12)
    assert f0[0] == cost.op_time(Op.FORWARD, 0, 0, chunks[0])  # the first stage's dropped forward is full
    busiest, _ = lower_bound(plan, chunks, [8192], cost)
    assert busiest == pytest.approx(r.busy[1])  # the last stage is the busiest, with its cheap dropped forward
    assert r.busy[1] == pytest.approx(f0[1] + sum(cost.op_time(op, 1, c, chunks[c]) for op, c in
                                                  [(Op.FORWARD, 1), (Op.BACKWARD, 1), (Op.RECOMPUTE, 0),
                                                   (Op.BACKWARD, 0)]), rel=1e-12)


def test_uniform_cost_prices_a_dropped_forward_as_given() -> None:
    assert CostModel.uniform(2).op_time(Op.FORWARD, 1, 0, CHAIN[1], keep=False) == \
        CostModel.uniform(2).op_time(Op.FORWARD, 1, 0, CHAIN[1])  # no model to count: a full forward
    cheap = CostModel.uniform(2, per_token=1.0, per_pair=0.5, drop_last_per_token=0.25, drop_last_per_pair=0.0)
    assert cheap.op_time(Op.FORWARD, 1, 0, CHAIN[1], keep=False) == 1.0  # 4 tokens x 0.25
    with pytest.raises(ValueError, match="go together"):
        CostModel.uniform(2, drop_last_per_token=0.5)
    with pytest.raises(ValueError, match="computes less than a kept one"):
        CostModel.uniform(2, per_token=1.0, drop_last_per_token=2.0, drop_last_per_pair=0.0)


class _Recording:
    """A real cost model that also records the ``keep`` each forward's time is asked with."""

    def __init__(self, cost: CostModel) -> None:
        self.cost, self.pp, self.forwards = cost, cost.pp, set()

    def op_time(self, op, stage, chunk, segments, keep=True):
        if op is Op.FORWARD:
            self.forwards.add((stage, chunk, keep))
        return self.cost.op_time(op, stage, chunk, segments, keep)

    def comm_time(self, tokens):
        return self.cost.comm_time(tokens)


def test_scheduler_and_lower_bound_ask_each_forward_with_its_keep() -> None:
    # The scheduler's interleaving and lower_bound's critical path both time forwards: a dropped one on the
    # last stage must be asked as dropped there too, not only in simulate.
    chunks = CHAIN + [[Segment(1, 0, 6)]]
    lens = [12, 6]
    spy = _Recording(CostModel.from_model(get_preset("qwen7b"), 2, link_bytes_per_s=None))
    plan = plan_pipeline(chunks, lens, pp=2, k=1, cost=spy)
    forwards = {(s, a.chunk, a.keep) for s in range(2) for a in plan.compute(s) if a.op is Op.FORWARD}
    assert {(s, c) for s, c, keep in forwards if not keep} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert spy.forwards == forwards
    spy.forwards.clear()
    lower_bound(plan, chunks, lens, spy)
    assert spy.forwards == forwards


def test_measured_costs_replay_a_recorded_run() -> None:
    chunks = [[Segment(0, 0, 4)], [Segment(1, 0, 4)]]
    plan = plan_pipeline(chunks, [4, 4], pp=2, k=1)
    durations = {(s, op, c): float(1 + s + c) * (2 if op is Op.BACKWARD else 1)
                 for s in range(2) for op in Op for c in range(2)}
    r = simulate(plan, chunks, [4, 4], MeasuredCost(durations, num_stages=2))
    assert [e.end - e.start for e in r.events if e.stage == 1 and e.chunk == 1] == [3.0, 6.0]
    with pytest.raises(KeyError, match="no measured duration for FORWARD of chunk 1 on stage 0"):
        missing = {key: d for key, d in durations.items() if key != (0, Op.FORWARD, 1)}
        simulate(plan, chunks, [4, 4], MeasuredCost(missing, num_stages=2))


def test_timeline_stats_from_events() -> None:
    events = [TimedEvent(0, "forward", 0, 0.0, 1.0), TimedEvent(1, "forward", 0, 1.0, 2.0),
              TimedEvent(1, "backward", 0, 2.0, 4.0)]
    stats = timeline_stats(events, 2)
    assert stats.step_time == 4.0 and stats.busy == (1.0, 3.0)
    assert stats.bubble == (0.75, 0.25) and stats.bubble_total == 0.5


def _count(pixels, hex_color: str) -> int:
    rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return sum(1 for p in pixels if p[:3] == rgb)


def test_gantt_png_shows_each_op_in_proportion(tmp_path) -> None:
    from PIL import Image

    events = [TimedEvent(0, "forward", 0, 0.0, 2.0), TimedEvent(1, "forward", 0, 2.0, 4.0),
              TimedEvent(1, "backward", 0, 4.0, 10.0), TimedEvent(0, "backward", 0, 10.0, 16.0)]
    path = draw_timeline(events, tmp_path / "sub" / "step.png", 3, title="two stages", labels=False,
                         legend=False, dpi=50)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (600, int(50 * (0.5 * 3 + 1.2)))
        pixels = list(img.convert("RGB").getdata())
    fwd, bwd = _count(pixels, COLORS["forward"]), _count(pixels, COLORS["backward"])
    idle = _count(pixels, COLORS["idle"])
    assert _count(pixels, COLORS["recompute"]) == 0  # no recompute event: no recompute colour
    assert bwd / fwd == pytest.approx(3.0, rel=0.05)  # 12 time units of backward vs 4 of forward
    # idle: stages 0 and 1 each 16 - 8 units, stage 2 (no events) all 16: 32 units vs 4 of forward
    assert idle / fwd == pytest.approx(8.0, rel=0.05)

    with_recompute = events + [TimedEvent(2, "recompute", 1, 0.0, 2.0), TimedEvent(2, "recompute", 2, 4.0, 6.0)]
    path2 = draw_timeline(with_recompute, tmp_path / "r.png", 3, labels=False, legend=False, dpi=50)
    with Image.open(path2) as img:
        pixels = list(img.convert("RGB").getdata())
    recompute = _count(pixels, COLORS["recompute"])
    assert recompute == pytest.approx(_count(pixels, COLORS["forward"]), rel=0.05)  # same bars as the forwards
