"""Split backward at the plan level: B(in) + W actions from the scheduler, their costs, checker rules and simulation.

Pure python (no torch). The runtime that executes ``B(in)`` and ``W`` is tested elsewhere.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from single_device_oracle import plan_single_device
from test_pipeline_plan import EXAMPLE, EXAMPLE_LENS, replicas, unit_cost

from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import get_preset
from chunkflow_pl.schedule.cost import CostModel, MeasuredCost, action_time
from chunkflow_pl.schedule.pipeline_actions import Action, Comm, CommOp, Op, PipeAction, PipelinePlan
from chunkflow_pl.schedule.pipeline_checker import PlanError, check_pipeline, check_pipeline_plan
from chunkflow_pl.schedule.scheduler import default_caps, plan_pipeline
from chunkflow_pl.schedule.simulator import lower_bound, simulate
from chunkflow_pl.schedule.timeline import ascii_timeline

Chunks = list[list[Segment]]
_COMM = {">A": (CommOp.SEND_ACT, 1), "<A": (CommOp.RECV_ACT, -1), ">G": (CommOp.SEND_GRAD, -1),
         "<G": (CommOp.RECV_GRAD, 1)}
_COMPUTE = {"F": Op.FORWARD, "R": Op.RECOMPUTE, "B": Op.BACKWARD, "W": Op.WEIGHT}


def parse_stage(text: str, stage: int, chunks: Chunks) -> list[PipeAction]:
    """``"<A0 F0 B0(in) >G0 W0"`` on ``stage`` -> actions (peers: the neighbours, sizes: the chunks' tokens)."""
    out: list[PipeAction] = []
    for word in text.split():
        m = re.fullmatch(r"([<>][AG]|[FRBW])(\d+)(\(drop\)|\(in\))?", word)
        assert m, word
        c = int(m[2])
        if m[1] in _COMM:
            op, step = _COMM[m[1]]
            out.append(Comm(op, c, stage + step, sum(s.length for s in chunks[c])))
        else:
            out.append(Action(_COMPUTE[m[1]], c, keep=m[3] != "(drop)", split=m[3] == "(in)"))
    return out


def compute_text(plan, s: int) -> str:
    return " ".join(map(str, plan.compute(s)))


# -- scheduler ----------------------------------------------------------------------------------------


def test_docstring_split_example_is_what_the_scheduler_gives() -> None:
    from chunkflow_pl.schedule import scheduler

    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=2, cost=unit_cost(2), split_backward=True)
    check_pipeline_plan(plan, EXAMPLE, EXAMPLE_LENS)
    result = simulate(plan, EXAMPLE, EXAMPLE_LENS, unit_cost(2))
    doc = scheduler.__doc__
    for s in range(2):
        assert f"    stage {s}: {compute_text(plan, s)}\n" in doc
    for line in ascii_timeline(result.events, 2).splitlines():
        assert f"    {line}\n" in doc, line
    unsplit = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=2, cost=unit_cost(2))
    assert (result.step_time, simulate(unsplit, EXAMPLE, EXAMPLE_LENS, unit_cost(2)).step_time) == (19.0, 22.0)
    assert result.peak_live == (2, 2)  # a chunk whose W is pending still holds its slot


@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_uniform_micro_batches_lose_only_forward_and_input_gradient_to_the_bubble(p: int, m: int) -> None:
    """F = B(in) = W = 1. The last stage (cap 1) must run F B W per micro-batch, its first F no earlier than
    p - 1, and its last B(in) still has p - 1 stages to go down before stage 0's last W: step 3m + 2(p - 1), the
    least the caps allow, against 1F1B's 3(m + p - 1). W fills what was the W part of every bubble."""
    chunks = [[Segment(i, 0, 4)] for i in range(m)]
    plan = plan_pipeline(chunks, [4] * m, p, k=1, cost=unit_cost(p), split_backward=True)
    check_pipeline_plan(plan, chunks, [4] * m)
    result = simulate(plan, chunks, [4] * m, unit_cost(p))
    assert result.step_time == 3 * m + 2 * (p - 1)
    assert result.bubble_total == pytest.approx(2 * (p - 1) / (3 * m + 2 * (p - 1)), rel=1e-12)
    assert compute_text(plan, p - 1) == " ".join(f"F{i} B{i}(in) W{i}" for i in range(m))


@settings(max_examples=50, deadline=None)
@given(replicas(), st.integers(1, 4), st.integers(1, 2), st.sampled_from([1, None]),
       st.sampled_from([0.0, 0.02]), st.sampled_from([0.0, 0.3]))
def test_split_plans_are_valid_and_do_the_same_work(case: tuple[Chunks, list[int]], pp: int, k: int,
                                                   max_open: int | None, per_pair: float, latency: float) -> None:
    chunks, lens = case
    cost = CostModel.uniform(pp, per_token=0.1, per_pair=per_pair, comm_latency=latency)
    plan = plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, split_backward=True)
    check_pipeline_plan(plan, chunks, lens)
    assert plan.caps == default_caps(pp, k)
    assert plan == plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open, split_backward=True)

    required = [c for c, chunk in enumerate(chunks) if chunk]
    backwards = [[a.chunk for a in plan.compute(s) if a.op is Op.BACKWARD] for s in range(pp)]
    assert all(b == backwards[0] for b in backwards)  # one backward order, as unsplit
    for s in range(pp):
        acts = plan.compute(s)
        assert all(a.split for a in acts if a.op is Op.BACKWARD)
        where = {(a.op, a.chunk): i for i, a in enumerate(acts)}
        assert sorted(a.chunk for a in acts if a.op is Op.WEIGHT) == required
        assert all(where[(Op.BACKWARD, c)] < where[(Op.WEIGHT, c)] for c in required)

    split = simulate(plan, chunks, lens, cost)
    assert all(peak <= cap for peak, cap in zip(split.peak_live, plan.caps))
    assert split.step_time >= max(lower_bound(plan, chunks, lens, cost)) * (1 - 1e-12)
    whole = simulate(plan_pipeline(chunks, lens, pp, k, cost=cost, max_open_chains=max_open), chunks, lens, cost)
    assert sum(split.busy) == pytest.approx(sum(whole.busy), rel=1e-12)  # B(in) + W = B; same recomputes


def test_a_due_backward_whose_recompute_finds_no_slot_runs_the_pending_w_first() -> None:
    # Chains 0 -> 1 and 3 -> 4 (both open at once), standalone chunk 2. On the last stage (cap 1), after B2(in)
    # chunk 2 holds the only slot until W2, and chunk 0's backward is due (the chain's turn) but R0 needs that
    # slot: W2 runs before the dropped forward F3 that could also start (it needs no slot), so the backward,
    # which stage 0 waits for, goes first.
    chunks: Chunks = [[Segment(2, 0, 4)], [Segment(0, 0, 3), Segment(2, 4, 5)], [Segment(1, 0, 3)],
                      [Segment(3, 0, 4)], [Segment(3, 4, 7)]]
    lens = [3, 3, 5, 7]
    plan = plan_pipeline(chunks, lens, pp=2, k=1, cost=unit_cost(2), max_open_chains=None, split_backward=True)
    check_pipeline_plan(plan, chunks, lens)
    assert compute_text(plan, 1) == "F0(drop) F1 B1(in) W1 F2 B2(in) W2 R0 B0(in) F3(drop) W0 F4 B4(in) W4 R3 B3(in) W3"


@settings(max_examples=30, deadline=None)
@given(replicas(), st.integers(1, 4))
def test_one_stage_split_plan_is_the_single_device_plan_with_each_backward_cut_in_two(
        case: tuple[Chunks, list[int]], k: int) -> None:
    chunks, lens = case
    words = []
    for a in plan_single_device(chunks, lens, k):
        if chunks[a.chunk]:
            words += [f"B{a.chunk}(in)", f"W{a.chunk}"] if a.op is Op.BACKWARD else [str(a)]
    plan = plan_pipeline(chunks, lens, pp=1, k=k, split_backward=True)
    assert compute_text(plan, 0) == " ".join(words)
    unsplit = plan_pipeline(chunks, lens, pp=1, k=k)
    cost = CostModel.uniform(1)
    assert simulate(plan, chunks, lens, cost).peak_live == simulate(unsplit, chunks, lens, cost).peak_live


def test_split_off_is_the_default_and_emits_no_weight() -> None:
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=3, k=1, cost=unit_cost(3))
    assert plan == plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=3, k=1, cost=unit_cost(3), split_backward=False)
    assert not any(a.op is Op.WEIGHT or a.split for s in range(3) for a in plan.compute(s))


# -- cost model ---------------------------------------------------------------------------------------


def test_weight_is_the_linear_layers_weight_gradient_and_the_halves_add_up() -> None:
    chunk = [Segment(0, 24_576, 32_768)]  # 8K new tokens after a 24K prefix: attention-heavy
    cost = CostModel.from_model(get_preset("qwen7b"), 2, link_bytes_per_s=None)
    for s in range(2):
        f = cost.op_time(Op.FORWARD, s, 0, chunk)
        b = cost.op_time(Op.BACKWARD, s, 0, chunk)
        b_in = cost.op_time(Op.BACKWARD, s, 0, chunk, split=True)
        w = cost.op_time(Op.WEIGHT, s, 0, chunk)
        assert w == pytest.approx(cost.per_token[s] * 8192, rel=1e-12)  # X^T dY: one product per forward one
        assert b_in + w == pytest.approx(b, rel=1e-12) and b == pytest.approx(2 * f, rel=1e-12)
        assert b_in > 2 * w  # attention's whole backward is in B
    flat = unit_cost(2)  # no attention term: the two halves are equal, each one forward
    assert flat.op_time(Op.BACKWARD, 0, 0, chunk, split=True) == flat.op_time(Op.WEIGHT, 0, 0, chunk) == \
        flat.op_time(Op.FORWARD, 0, 0, chunk)
    with pytest.raises(ValueError, match="only a backward splits"):
        cost.op_time(Op.FORWARD, 0, 0, chunk, split=True)
    ckpt = replace(cost, backward=3.0)  # full layer checkpointing: the extra forward is B(in)'s, W is unchanged
    assert ckpt.op_time(Op.WEIGHT, 1, 0, chunk) == cost.op_time(Op.WEIGHT, 1, 0, chunk)
    assert ckpt.op_time(Op.BACKWARD, 1, 0, chunk, split=True) == pytest.approx(
        cost.op_time(Op.BACKWARD, 1, 0, chunk, split=True) + cost.op_time(Op.FORWARD, 1, 0, chunk), rel=1e-12)


class _BeforeSplit:
    """A cost model written before split backward: ``op_time`` has no ``split`` argument."""

    pp = 2

    def op_time(self, op, stage, chunk, segments, keep=True):
        return {Op.FORWARD: 1.0, Op.BACKWARD: 2.0, Op.RECOMPUTE: 1.0, Op.WEIGHT: 0.5}[op]

    def comm_time(self, tokens):
        return 0.0


def test_action_time_asks_split_only_of_a_split_backward() -> None:
    old = _BeforeSplit()
    assert action_time(old, Action(Op.BACKWARD, 0), 0, EXAMPLE[0]) == 2.0
    assert action_time(old, Action(Op.WEIGHT, 0), 0, EXAMPLE[0]) == 0.5
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=2, k=1, cost=old)  # unsplit plans still plan and simulate
    assert simulate(plan, EXAMPLE, EXAMPLE_LENS, old).step_time > 0
    with pytest.raises(TypeError, match="split"):
        action_time(old, Action(Op.BACKWARD, 0, split=True), 0, EXAMPLE[0])


def test_measured_costs_replay_a_split_run() -> None:
    chunks = [[Segment(0, 0, 4)]]
    plan = plan_pipeline(chunks, [4], pp=2, k=1, split_backward=True)
    timed = ((Op.FORWARD, 1.0), (Op.BACKWARD, 1.5), (Op.WEIGHT, 0.25))
    durations = {(s, op, 0): d for s in range(2) for op, d in timed}
    r = simulate(plan, chunks, [4], MeasuredCost(durations, num_stages=2))
    assert [(e.stage, e.op, e.start, e.end) for e in r.events] == [
        (0, "forward", 0.0, 1.0), (0, "backward", 3.5, 5.0), (0, "weight", 5.0, 5.25),
        (1, "forward", 1.0, 2.0), (1, "backward", 2.0, 3.5), (1, "weight", 3.5, 3.75)]
    with pytest.raises(KeyError, match="no measured duration for WEIGHT of chunk 0 on stage 1"):
        simulate(plan, chunks, [4], MeasuredCost({k: d for k, d in durations.items() if k != (1, Op.WEIGHT, 0)}, 2))


# -- simulator ----------------------------------------------------------------------------------------


def test_one_chunk_split_timeline_and_bound() -> None:
    """F, B(in), W 1 each: B(in) goes down at once, W runs after it. Unsplit: F F B B, 6."""
    chunks = [[Segment(0, 0, 4)]]
    plan = plan_pipeline(chunks, [4], pp=2, k=1, cost=unit_cost(2), split_backward=True)
    assert plan.text() == "stage 0: F0 >A0 <G0 B0(in) W0\nstage 1: <A0 F0 B0(in) >G0 W0"
    r = simulate(plan, chunks, [4], unit_cost(2))
    assert ascii_timeline(r.events, 2) == ("time     0  1  2  3  4\n"
                                           "stage 0  F0 .  .  B0 W0\n"
                                           "stage 1  .  F0 B0 W0 .")
    assert (r.step_time, r.busy, r.peak_live) == (5.0, (3.0, 3.0), (1, 1))
    assert lower_bound(plan, chunks, [4], unit_cost(2)) == (3.0, 5.0)  # the path ends with stage 0's W


# -- checker: hand-made split plans on 2 stages -------------------------------------------------------

TWO: Chunks = [[Segment(0, 0, 4)], [Segment(1, 0, 2)]]
TWO_LENS = [4, 2]
GOOD = ["F0 >A0 F1 >A1 <G0 B0(in) W0 <G1 B1(in) W1", "<A0 F0 B0(in) >G0 W0 <A1 F1 B1(in) >G1 W1"]


def check(texts: list[str], caps=(2, 1)) -> None:
    check_pipeline([parse_stage(t, s, TWO) for s, t in enumerate(texts)], TWO, TWO_LENS, caps)


def test_checker_accepts_the_split_plan_the_mutations_below_break() -> None:
    check(GOOD)
    deferred = [GOOD[0], "<A0 F0 B0(in) >G0 <A1 F1 B1(in) >G1 W1 W0"]  # Ws deferred: cap 2 holds them
    check(deferred, caps=(2, 2))
    stages = tuple(tuple(parse_stage(t, s, TWO)) for s, t in enumerate(deferred))
    plan = PipelinePlan(stages, (2, 2), (4, 2))
    assert simulate(plan, TWO, TWO_LENS, unit_cost(2)).peak_live == (2, 2)  # chunk 0 stays live until W0


@pytest.mark.parametrize(
    ("texts", "caps", "message"),
    [
        # W before its own B
        (["F0 >A0 F1 >A1 W0 <G0 B0(in) <G1 B1(in) W1", GOOD[1]], (2, 1),
         "stage 0, action 4 (W0): weight gradient of chunk 0 before its split backward"),
        # a split B without its W
        ([GOOD[0], "<A0 F0 B0(in) >G0 W0 <A1 F1 B1(in) >G1"], (2, 1),
         "stage 1, missing WEIGHT of chunks [1]: their backward is split"),
        # a W for a backward that already computed the parameter gradients
        (["F0 >A0 F1 >A1 <G0 B0 W0 <G1 B1(in) W1", GOOD[1]], (2, 1),
         "stage 0, action 6 (W0): WEIGHT of chunk 0, whose backward is not split"),
        (["F0 >A0 F1 >A1 <G0 B0(in) W0 <G1 B1(in) W1 W0", GOOD[1]], (2, 1),
         "stage 0, action 10 (W0): duplicate WEIGHT of chunk 0"),
        # deferred Ws keep their chunks live: cap 1 on the last stage is exceeded by F1
        ([GOOD[0], "<A0 F0 B0(in) >G0 <A1 F1 B1(in) >G1 W1 W0"], (2, 1),
         "stage 1, action 5 (F1): live activations 2 exceed cap=1 (chunks [0, 1]; [0] wait for their WEIGHT)"),
    ],
)
def test_checker_rejects_mutated_split_plans(texts: list[str], caps: tuple[int, int], message: str) -> None:
    with pytest.raises(PlanError, match=re.escape(message)):
        check(texts, caps)


def test_checker_catches_every_single_action_removed_from_a_split_plan() -> None:
    plan = plan_pipeline(EXAMPLE, EXAMPLE_LENS, pp=3, k=2, cost=unit_cost(3), split_backward=True)
    check_pipeline_plan(plan, EXAMPLE, EXAMPLE_LENS)
    for s, acts in enumerate(plan.stages):
        for i in range(len(acts)):
            stages = [list(x) for x in plan.stages]
            del stages[s][i]
            with pytest.raises(PlanError):
                check_pipeline(stages, EXAMPLE, EXAMPLE_LENS, plan.caps)


# -- benchmark ----------------------------------------------------------------------------------------


def test_pipeline_bubbles_reports_rows_with_and_without_split() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_bubbles.py"
    out = subprocess.run([sys.executable, str(script), "--models", "7b", "--contexts", "32k", "--pps", "2,4",
                          "--batches", "1", "--global-batch", "64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = {(r["pp"], r["virtual"], r["split_backward"]): r for r in result["rows"]}
    assert sorted(rows) == [(pp, v, split) for pp in (2, 4) for v in (1, 2) for split in (False, True)]
    for pp, v in ((2, 1), (2, 2), (4, 1), (4, 2)):
        no, yes = rows[(pp, v, False)], rows[(pp, v, True)]
        assert yes["baseline_step_s"] == no["baseline_step_s"]  # the same 1F1B baseline
        assert yes["chunkflow_step_s"] < no["chunkflow_step_s"] and yes["chunkflow_bubble"] < no["chunkflow_bubble"]
        assert 0.0 <= yes["chunkflow_bubble_floor"] <= yes["chunkflow_bubble"]
    assert {"speedup_geomean", "split_speedup_geomean"} <= set(result)
    assert "v=2 split backward yes: speed-up" in out.stdout
    assert set(result["modes"]) == {"v=1 split=no", "v=1 split=yes", "v=2 split=no", "v=2 split=yes"}


# -- planners: split backward as a candidate ----------------------------------------------------------


def test_chunk_planner_considers_split_backward_and_says_when_it_picks_it() -> None:
    from chunkflow_pl.plan.core import PlanSpec, format_table, plan_chunking

    cfg = get_preset("qwen7b", num_layers=8)
    lens = [[30000, 9000, 4000, 2000, 1500, 800, 600, 300] * 2]
    spec = PlanSpec(memory_budget=2**50, precision="bf16-mixed", pp=4, chunk_sizes=(4096, 8192), ks=(1,),
                    split_backward=(False, True))
    result = plan_chunking(cfg, spec, lens)
    rows = {(r.chunk_size, r.split_backward): r for r in result.rows}
    assert sorted(rows) == [(4096, False), (4096, True), (8192, False), (8192, True)]
    for c in (4096, 8192):
        no, yes = rows[(c, False)], rows[(c, True)]
        assert yes.stage_peaks == no.stage_peaks  # the caps bound the slots a deferred W holds
        assert yes.step_time < no.step_time / (1 + 0.01)  # fills bubbles by more than the 1% tie
    assert result.best.split_backward and result.override().endswith(" parallel.split_backward=true")
    assert " split " in format_table(result).splitlines()[0]
    unsplit = plan_chunking(cfg, replace(spec, split_backward=(False,)), lens)  # the default: as before
    assert [r.split_backward for r in unsplit.rows] == [False, False] and "split" not in unsplit.override()
    assert " split " not in format_table(unsplit).splitlines()[0]
    one = plan_chunking(cfg, replace(spec, pp=1), lens)  # one device: nothing to fill, not planned
    assert not any(r.split_backward for r in one.rows)
    with pytest.raises(ValueError, match="split_backward candidates"):
        PlanSpec(memory_budget=1, split_backward=())


def test_layout_planner_considers_split_backward_where_there_is_a_pipeline() -> None:
    from chunkflow_pl.plan.core import PlanSpec
    from chunkflow_pl.plan.layout import ClusterSpec, plan_layout

    cfg = get_preset("qwen7b", num_layers=8)
    lens = [[30000, 9000, 4000, 2000, 1500, 800, 600, 300] * 2]
    spec = PlanSpec(memory_budget=0, precision="bf16-mixed", chunk_sizes=(8192,), ks=(1,), flops_per_s=4e14,
                    split_backward=(False, True))
    result = plan_layout(cfg, spec, ClusterSpec(4, 2**40), lens, layer_checkpoints=("none",))
    fitting = [r for r in result.rows if r.fits]
    assert {r.layout.split_backward for r in fitting if r.layout.pp == 1} == {False}
    pairs = {}
    for r in fitting:
        pairs.setdefault(replace(r.layout, split_backward=False), {})[r.layout.split_backward] = r
    piped = [p for lay, p in pairs.items() if lay.pp > 1]
    assert piped and all(p[True].compute_time < p[False].compute_time and p[True].peak == p[False].peak
                         for p in piped)
    assert result.best.layout.split_backward == (result.best.layout.pp > 1)
    assert result.override().endswith(" parallel.split_backward=true") == result.best.layout.split_backward


def test_planners_pick_split_backward_only_when_it_buys_more_than_the_tie() -> None:
    from chunkflow_pl.plan.core import Row, recommend
    from chunkflow_pl.plan.layout import Layout, LayoutRow, pick

    def row(split: bool, step: float) -> Row:
        return Row(8192, 1, 4.0, 0.1, step, 1.0 / step, (2**30,), True, split_backward=split)

    assert not recommend([row(True, 0.995), row(False, 1.0)]).split_backward  # within 1%: unsplit
    assert recommend([row(False, 1.0), row(True, 0.98)]).split_backward

    def lrow(split: bool, step: float) -> LayoutRow:
        return LayoutRow(Layout(2, 1, 1, "last_backward", "none", 8192, 1, split), 2**30, step, 0.0, 0.2, True)

    assert not pick([lrow(True, 0.995), lrow(False, 1.0)]).layout.split_backward
    assert pick([lrow(True, 0.98), lrow(False, 1.0)]).layout.split_backward


def test_gantt_png_draws_weight_actions(tmp_path) -> None:
    from PIL import Image

    from chunkflow_pl.schedule.timeline import COLORS, TimedEvent, draw_timeline

    events = [TimedEvent(0, "forward", 0, 0.0, 2.0), TimedEvent(0, "backward", 0, 2.0, 4.0),
              TimedEvent(0, "weight", 0, 4.0, 6.0)]
    path = draw_timeline(events, tmp_path / "w.png", 1, labels=False, legend=False, dpi=50)
    with Image.open(path) as img:
        pixels = [p[:3] for p in img.convert("RGB").getdata()]

    def count(color: str) -> int:
        return pixels.count(tuple(int(color[i:i + 2], 16) for i in (1, 3, 5)))

    assert count(COLORS["weight"]) == pytest.approx(count(COLORS["forward"]), rel=0.05)  # not drawn as idle
    assert count(COLORS["idle"]) < 0.05 * count(COLORS["weight"])
