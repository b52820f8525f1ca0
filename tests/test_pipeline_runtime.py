"""The chunk pipeline across processes (issue 9): torchrun with gloo, pp=2 and pp=2 x dp=2, trains exactly as
1 process; the executed schedule is the plan's; diverging ranks fail with the rank and chunk named.

The global batch mixes sequences split into chains of dependent chunks (chunk.size 32, up to 100 tokens)
and short ones packed together. The model has 3 layers (stage 0: embedding + layers 0, 1; stage 1: layer 2,
norm, head) and tied embeddings in the exactness run, so the tied-gradient sum between the first and last
stage is covered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import hf_reference_step, make_hf_model
from multiproc import free_port, gloo_strategy, run_train, spawn_ranks, write_token_records
from safetensors.torch import load_file

from chunkflow_pl.data.types import Segment
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.schedule.runner import pipeline_cost
from chunkflow_pl.schedule.scheduler import plan_pipeline

COMMON = ["data=jsonl", "data.global_batch_size=7", "data.shuffle=false", "chunk.size=32",
          "trainer.precision=64-true", "optim.weight_decay=0", "optim.grad_clip=0", "model.loss_chunk=16",
          "optim=sgd", "optim.warmup_steps=0", "optim.schedule=constant", "callbacks.checkpoint=null"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp")
    make_hf_model(tie=True, dtype=torch.float32, seed=7, std=0.1, layers=3).save_pretrained(d / "tied")
    make_hf_model(tie=False, dtype=torch.float32, seed=8, std=0.1, layers=3).save_pretrained(d / "untied")
    seqs, labels = write_token_records(d / "data.jsonl")
    return d, seqs, labels


def data_args(d: Path, model: str) -> list[str]:
    return [f"model.pretrained={d / model}", f"data.path={d / 'data.jsonl'}", f"data.cache_dir={d / 'cache'}",
            *COMMON]


def exported(run: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export, one file or the shards its index names."""
    index = run / "export" / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        shard = load_file(str(run / "export" / name))
        assert not set(shard) & set(out), f"{name} repeats tensors"
        out.update(shard)
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        err = float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300))
        assert err < rtol, f"{k}: relative difference {err:.2e}"


@pytest.mark.slow
def test_pp2_and_pp2_dp2_train_like_one_process(case, tmp_path):
    d, _, _ = case
    one, pp2, pp2dp2 = tmp_path / "one", tmp_path / "pp2", tmp_path / "pp2dp2"
    steps = ["trainer.max_steps=2", "optim.lr=0.5"]
    run_train(1, one, *data_args(d, "tied"), *steps, "chunk.k=1", f"export.hf_dir={one / 'export'}")
    run_train(2, pp2, *data_args(d, "tied"), *steps, "chunk.k=2", f"export.hf_dir={pp2 / 'export'}",
              "parallel=pp2", "parallel.check_messages=true", "callbacks.timeline.every_n_train_steps=1")
    run_train(4, pp2dp2, *data_args(d, "tied"), *steps, "chunk.k=1", f"export.hf_dir={pp2dp2 / 'export'}",
              "parallel=dp2_pp2", timeout=400)
    w1 = exported(one)
    assert any(not torch.equal(w1[k], v) for k, v in load_file(str(d / "tied" / "model.safetensors")).items())
    assert sorted((pp2 / "export").glob("*.safetensors")) == [
        pp2 / "export" / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert_close(exported(pp2), w1, 1e-8)
    assert_close(exported(pp2dp2), w1, 1e-8)

    # The merged export of the pipeline loads in transformers, with the 1-process export's logits.
    from transformers import Qwen2ForCausalLM

    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    l1 = Qwen2ForCausalLM.from_pretrained(one / "export").eval()(ids).logits
    l2 = Qwen2ForCausalLM.from_pretrained(pp2 / "export").eval()(ids).logits
    torch.testing.assert_close(l2, l1, rtol=1e-7, atol=1e-7)

    # Each recorded step ran the plan every rank derives from the batch, in order, within its caps.
    cost = pipeline_cost(ModelConfig.from_hf_dir(d / "tied"), 2)
    records = sorted((pp2 / "timeline").glob("step_*.json"))
    assert len(records) == 2 and len(list((pp2 / "timeline").glob("step_*.png"))) == 4
    for path in records:
        rec = json.loads(path.read_text())
        chunks = [[Segment(*seg) for seg in c] for c in rec["chunks"]]
        plan = plan_pipeline(chunks, rec["seq_lens"], 2, 2, cost=cost)
        assert rec["plan"] == plan.text()
        assert any(a.op.value == "recompute" for a in plan.compute(0))  # chains longer than k = 2: recomputes
        for st in rec["stages"]:
            ran = [(op, c) for op, c, _, _ in st["events"]]
            assert ran == [(a.op.value, a.chunk) for a in plan.stages[st["stage"]]]
            assert 1 <= st["peak_live"] <= st["cap"] == plan.caps[st["stage"]]
            starts = [t0 for _, _, t0, _ in st["events"]]
            assert starts == sorted(starts)


@pytest.mark.slow
def test_cli_step_with_pp2_is_minus_lr_times_the_whole_batch_gradient(case, tmp_path):
    d, seqs, labels = case
    lr = 0.5
    run_train(2, tmp_path, *data_args(d, "untied"), f"optim.lr={lr}", "trainer.max_steps=1", "chunk.k=1",
              f"export.hf_dir={tmp_path / 'export'}", "parallel.pp=2")
    ref_w, ref_g = hf_reference_step(d / "untied", seqs[:7], labels[:7])
    new = exported(tmp_path)
    assert set(new) == set(ref_w)
    for k, w in new.items():
        delta, expect = w - ref_w[k], -lr * ref_g[k]
        err = float((delta - expect).norm() / expect.norm().clamp_min(1e-300))
        assert err < 1e-8, f"{k}: relative error {err:.2e}"


# ---- when a sent buffer may be dropped (pure) --------------------------------------------------------------

def test_sends_are_released_only_after_the_peer_received_them():
    """Run random plans in random interleavings (a receive waits for its send, nothing else blocks); when a
    stage completes a receive, every send ``release_points`` frees there must already be received by its peer.
    A send is left to the end of the step only when the peer sends nothing back after receiving it."""
    import random

    from chunkflow_pl.data.packing import build_chunk_plan
    from chunkflow_pl.schedule.cost import CostModel
    from chunkflow_pl.schedule.pipeline_actions import Comm
    from chunkflow_pl.strategy.p2p import release_points

    rng = random.Random(0)
    for _ in range(40):
        pp, k = rng.randint(2, 5), rng.randint(1, 3)
        lens = [rng.randint(1, 150) for _ in range(rng.randint(2, 14))]
        plan = plan_pipeline(build_chunk_plan(lens, 32).chunks, lens, pp, k, cost=CostModel.uniform(pp))
        stages = plan.stages
        release = [release_points(stages, s) for s in range(pp)]
        where = [{(a.op, a.chunk): i for i, a in enumerate(acts)} for acts in stages]
        pc, posted, freed = [0] * pp, set(), set()
        while any(pc[s] < len(stages[s]) for s in range(pp)):
            movable = []
            for s in range(pp):
                if pc[s] < len(stages[s]):
                    a = stages[s][pc[s]]
                    if not isinstance(a, Comm) or a.is_send or (a.kind, a.chunk, a.peer, s) in posted:
                        movable.append(s)
            s = rng.choice(movable)
            a = stages[s][pc[s]]
            pc[s] += 1
            if isinstance(a, Comm) and a.is_send:
                posted.add((a.kind, a.chunk, s, a.peer))
            elif isinstance(a, Comm):
                for kind, chunk in release[s].get((a.kind, a.chunk), []):
                    peer = a.peer
                    recv_op = next(op for op, c in where[peer] if c == chunk and op.value == f"recv_{kind}")
                    assert pc[peer] > where[peer][(recv_op, chunk)], (plan.text(), s, a, kind, chunk)
                    freed.add((s, kind, chunk))
        for s, acts in enumerate(stages):
            for a in acts:
                if isinstance(a, Comm) and a.is_send and (s, a.kind, a.chunk) not in freed:
                    got = where[a.peer][(next(op for op, c in where[a.peer] if c == a.chunk and
                                              op.value == f"recv_{a.kind}"), a.chunk)]
                    later = [b for b in stages[a.peer][got:] if isinstance(b, Comm) and b.is_send and b.peer == s]
                    assert not later, (plan.text(), s, a, later[0])


# ---- diverging ranks: errors, not hangs (2 spawned gloo processes, no training) ----------------------------

def _diverge_worker(rank: int, init: str, out_dir: str) -> None:
    from chunkflow_pl.schedule.cost import CostModel
    from chunkflow_pl.schedule.pipeline_actions import Comm, CommOp
    from chunkflow_pl.strategy.dims import ParallelDims
    from chunkflow_pl.strategy.p2p import P2PTransport
    from chunkflow_pl.strategy.step import compare_plans

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    dims = ParallelDims(dp=1, pp=2, world_size=2)
    result = []
    try:
        chunks = [[Segment(0, 0, 4)], [Segment(1, 0, 4)], [Segment(2, 0, 6)]]
        plan = plan_pipeline(chunks, [4, 4, 6], 2, 1, cost=CostModel.uniform(2))
        # 1. Plans that differ (rank 1 saw chunk 2 with 5 tokens) are caught before any message moves.
        other = plan_pipeline(chunks[:2] + [[Segment(2, 0, 5)]], [4, 4, 5], 2, 1, cost=CostModel.uniform(2))
        try:
            compare_plans(plan if rank == 0 else other, rank, dist.group.WORLD, [0, 1], step=3)
        except RuntimeError as e:
            result.append(str(e))
        # 2. The same plan through the transport: the payloads arrive where the plan says.
        def payload(c: int, sign: float) -> torch.Tensor:
            return torch.full((plan.chunk_tokens[c], 3), sign * c, dtype=torch.float64)

        for check in (False, True):
            t = P2PTransport(dims, rank, torch.device("cpu"), check_messages=check)
            t.begin_step(5, plan.stages, hidden_size=3, dtype=torch.float64)
            for a in plan.stages[rank]:
                op, c = a.op.value, a.chunk
                if op in ("send_act", "send_grad"):
                    t.send(op[5:], c, payload(c, 1.0 if op == "send_act" else -1.0))
                elif op in ("recv_act", "recv_grad"):
                    x = t.recv(op[5:], c, (plan.chunk_tokens[c], 3), torch.float64, torch.device("cpu"))
                    assert torch.equal(x, payload(c, 1.0 if op == "recv_act" else -1.0)), (rank, a)
            t.flush()
        result.append("exchanged")
        # 3. With check_messages, a sender that left its plan (sends chunk 1 where chunk 0 is due) is named.
        t = P2PTransport(dims, rank, torch.device("cpu"), check_messages=True)
        t.begin_step(7, [[], [Comm(CommOp.RECV_ACT, 0, 0, 4)]], hidden_size=3, dtype=torch.float64)
        if rank == 0:
            t.send("act", 1, torch.zeros(4, 3, dtype=torch.float64))
            t.flush()
        else:
            try:
                t.recv("act", 0, (4, 3), torch.float64, torch.device("cpu"))
            except RuntimeError as e:
                result.append(str(e))
            dist.recv(torch.empty(4, 3, dtype=torch.float64), src=0, group=t._in["act"].group)  # drain the payload
        dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_diverging_ranks_fail_naming_rank_and_chunk(tmp_path, monkeypatch):
    # for the spawned children only: a thread count left in this process's environment would change the
    # float bits of every later test that compares a subprocess run with an in-process one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_diverge_worker, (f"file://{tmp_path / 'store'}", str(tmp_path)),
                hang="the ranks hang instead of naming the divergence")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for msgs in (r0, r1):
        assert "the pipeline plan of rank 1" in msgs[0] and "chunk 2 has 5 tokens on rank 1 but 6 on rank 0" in msgs[0]
    assert r0[1:] == ["exchanged"] and r1[1] == "exchanged"
    assert r1[2].startswith("rank 1 (stage 1, dp rank 0), step 7: expected the act of chunk 0 (4 tokens) of step 7 "
                            "from rank 0 (stage 0), but rank 0 sent the act of chunk 1 (4 tokens) of step 7"), r1[2]


# ---- the end of a run: no gloo thread outlives the process groups (2 spawned gloo processes) ----------------

def _gloo_threads() -> list[str]:
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if "gloo" in n)


def _teardown_worker(rank: int, port: int, out_dir: str) -> None:
    from chunkflow_pl.strategy.dims import ParallelDims

    # default group, mesh, tied-embedding group, P2P channels
    strategy = gloo_strategy(rank, port, ParallelDims(dp=1, pp=2, world_size=2, num_layers=2))
    during = _gloo_threads()
    loss = strategy.from_last_stage([float(rank)])
    strategy.destroy_process_groups()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps([during, loss, dist.is_initialized(), _gloo_threads()]))


@pytest.mark.slow
def test_destroy_process_groups_joins_every_gloo_thread(tmp_path, monkeypatch):
    """A gloo worker thread alive while the interpreter finalises can abort the process after a finished run
    ("terminate called without an active exception"; see ``ChunkFlowStrategy.destroy_process_groups``)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_teardown_worker, (free_port(), str(tmp_path)))
    for r in (0, 1):
        during, loss, initialized, after = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "pt_gloo_runloop" in during and "gloo_tcp_loop" in during, during  # the probe sees the threads
        assert loss == [1.0]
        assert not initialized and after == [], (r, after)
