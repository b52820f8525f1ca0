"""Split backward at run time (``parallel.split_backward``): B computes input and key/value state gradients, a later
W the linear weights' gradients, and the step's gradient is the unsplit one (float64), whatever W's place.

One process, the whole model (chains of 3-5 chunks, k=1 recomputes and k=64 nothing): hand-written split plans
(W all at the end in B order, reversed, or one B late) against the unsplit plan (the same bits when W keeps B's
order) and transformers. Two gloo processes (pp=2) with every W deferred to its stage's end. train.py under
torchrun: pp=2 and FSDP2 dp_shard=2 against one process after 2 AdamW steps. A W lost or run twice fails them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from single_device_oracle import plan_single_device

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, to_hf_name
from chunkflow_pl.model.split_linear import SplitLinear, WeightGradStash, apply_split_linear
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.pipeline_actions import Action, Op

CHUNK = 16
LENS = [5, 40, 13, 70, 16, 17]  # standalone chunks, chains of 3 and 5 chunks (k=1: recomputed), CHUNK + 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(tie=False, dtype=torch.float64, seed=5)
    hf.save_pretrained(d)
    cfg = ModelConfig.from_hf_dir(d)
    plain = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(plain, d, cfg)
    split = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(split, d, cfg)
    assert apply_split_linear(split) == 7 * cfg.num_layers
    seqs, targets, batch = make_batch(cfg)
    n_label = batch.num_label_tokens
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    ref = {name: hf.get_parameter(to_hf_name(name)).grad.clone() for name, _ in plain.named_parameters()}
    return plain, split, batch, ref, d


def make_batch(cfg: ModelConfig):
    """The test's sequences, their targets and their StepBatch (the same in every process)."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    labels = [s.clone() for s in seqs]
    labels[1][:10] = -100
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(LENS, CHUNK)
    batch = assemble_step(plan.chunks, seqs, targets, LENS, list(range(len(seqs))), n_label, 0, len(plan.chunks))
    return seqs, targets, batch


def grads(model, batch, actions):
    model.zero_grad(set_to_none=True)
    stats = ChunkExecutor(model, batch, torch.device("cpu")).run(actions)
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}, stats


def unsplit(batch, k):
    return plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k)


def split_plan(batch, k, where: str):
    """The unsplit order with every B split; W placed: ``end`` (all at the end, B order), ``reversed`` (all at the
    end, reverse B order), ``lag`` (W of a chunk right after the next chunk's B; the last at the end)."""
    acts, ws = [], []
    for a in unsplit(batch, k):
        if a.op is not Op.BACKWARD:
            acts.append(a)
            continue
        acts.append(Action(Op.BACKWARD, a.chunk, split=True))
        if where == "lag":
            acts += [Action(Op.WEIGHT, c) for c in ws]
            ws = []
        ws.append(a.chunk)
    return acts + [Action(Op.WEIGHT, c) for c in (reversed(ws) if where == "reversed" else ws)]


def rel_err(got, ref):
    """Largest relative error over ``ref``'s parameters (a missing gradient counts as zero)."""
    return max(float(((got[n] if got[n] is not None else 0) - ref[n]).norm() / ref[n].norm().clamp_min(1e-300))
               for n in ref)


@pytest.mark.parametrize("k", [1, 64])  # 64: every chunk kept
def test_deferred_weight_gradients_equal_unsplit_and_transformers(setup, k):
    plain, split, batch, ref, _ = setup
    base, _ = grads(plain, batch, unsplit(batch, k))
    same_model, base_stats = grads(split, batch, unsplit(batch, k))
    assert (base_stats.recomputed_chunks > 0) == (k == 1)  # k=1: chains are recomputed
    assert rel_err(base, ref) < 1e-10
    assert all(torch.equal(same_model[n], base[n]) for n in base)  # SplitLinear unsplit: nn.Linear's bits
    for where in ("end", "lag", "reversed"):
        got, stats = grads(split, batch, split_plan(batch, k, where))
        assert rel_err(got, ref) < 1e-10, where
        assert rel_err(got, base) < 1e-12, where
        if where != "reversed":  # every weight's chunk gradients summed in the unsplit order: the same bits
            assert all(torch.equal(got[n], base[n]) for n in got), where
        assert stats.recomputed_chunks == base_stats.recomputed_chunks
    # key/value state offloaded to host memory: the same bits
    split.zero_grad(set_to_none=True)
    ChunkExecutor(split, batch, torch.device("cpu"), offload_state=True).run(split_plan(batch, k, "lag"))
    assert all(torch.equal(p.grad, base[n]) for n, p in split.named_parameters())
    # W at the end: every chunk holds its slot until then
    assert grads(split, batch, split_plan(batch, k, "end"))[1].max_live_activations == len(batch.chunks)


def test_split_backward_defers_exactly_the_linear_weights(setup):
    _, split, batch, _, _ = setup
    acts = [a for a in split_plan(batch, 1, "end") if a.op is not Op.WEIGHT]
    split.zero_grad(set_to_none=True)
    ex = ChunkExecutor(split, batch, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="awaiting their weight action"):
        ex.run(acts)
    linear = {f"{n}.weight" for n, m in split.named_modules() if isinstance(m, SplitLinear)}
    for n, p in split.named_parameters():
        assert (p.grad is None) == (n in linear), n  # biases, norms, embedding, head: in B
    assert sum(len(s) for s in ex._awaiting_w.values()) == len(linear) * len(batch.chunks)


def test_weight_without_its_split_backward_is_refused(setup):
    plain, split, batch, _, _ = setup
    acts = unsplit(batch, 1)
    i = next(i for i, a in enumerate(acts) if a.op is Op.BACKWARD)
    with pytest.raises(RuntimeError, match="without a pending split backward"):
        ChunkExecutor(split, batch, torch.device("cpu")).run(acts[:i + 1] + [Action(Op.WEIGHT, acts[i].chunk)])
    with pytest.raises(ValueError, match="parallel.split_backward"):
        ChunkExecutor(plain, batch, torch.device("cpu")).run(split_plan(batch, 1, "lag"))


@pytest.mark.parametrize("mutation", ["skipped", "twice"])
def test_a_lost_or_doubled_weight_gradient_fails_the_comparison(setup, monkeypatch, mutation):
    """The comparison above catches a W that adds nothing or adds twice (the mutation the runtime cannot see)."""
    _, split, batch, ref, _ = setup
    flush, calls = WeightGradStash.flush, []

    def mutated(self):  # the step's first W: lost, or run twice
        calls.append(1)
        if len(calls) == 1:
            if mutation == "twice":
                self.entries = self.entries * 2
            else:
                self.entries = []
        flush(self)

    monkeypatch.setattr(WeightGradStash, "flush", mutated)
    got, _ = grads(split, batch, split_plan(batch, 1, "lag"))
    assert len(calls) == len(batch.chunks) and rel_err(got, ref) > 1e-3


# ---- pp=2 over gloo: W deferred to the end of each stage's list, in reverse order ----------------------------

def _pp2_worker(rank: int, port: int, hf_dir: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from chunkflow_pl.model.stages import split_stages
    from chunkflow_pl.schedule.pipeline_actions import PipelinePlan
    from chunkflow_pl.schedule.runner import StepRunner
    from chunkflow_pl.strategy.dims import ParallelDims
    from chunkflow_pl.strategy.p2p import P2PTransport

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = ModelConfig.from_hf_dir(hf_dir)
        model = Qwen2Decoder(cfg, loss_chunk=8, stage=split_stages(cfg.num_layers, 2)[rank]).double()
        load_pretrained(model, hf_dir, cfg)
        apply_split_linear(model)

        class DeferredW(StepRunner):
            def plan(self, batch):  # every W after the stage's last message, latest B first; caps: all chunks
                p = super().plan(batch)
                stages = tuple(tuple(a for a in acts if getattr(a, "op", None) is not Op.WEIGHT)
                               + tuple(reversed([a for a in acts if getattr(a, "op", None) is Op.WEIGHT]))
                               for acts in p.stages)
                return PipelinePlan(stages, (len(batch.chunks),) * 2, p.chunk_tokens)

        runner = DeferredW(cfg, 1, "cpu", stage=rank, pp=2, split_backward=True,
                           transport=P2PTransport(ParallelDims(dp=1, pp=2, world_size=2), rank, torch.device("cpu")))
        run = runner.run(model, make_batch(cfg)[2])
        acts = run.plan.compute(rank)
        assert acts[-1].op is Op.WEIGHT and any(a.split for a in acts if a.op is Op.BACKWARD)
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()},
                    "peak_live": run.stats.max_live_activations, "recomputed": run.stats.recomputed_chunks},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_pp2_split_backward_with_deferred_weights_matches_one_process(setup, tmp_path, monkeypatch):
    from multiproc import free_port, spawn_ranks

    plain, _, batch, ref, d = setup
    base, _ = grads(plain, batch, unsplit(batch, 1))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn_ranks(_pp2_worker, (free_port(), str(d), str(tmp_path)), timeout=90, hang="the pp=2 split step hangs")
    got = {}
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        got.update(out["grads"])
        assert out["peak_live"] == len(batch.chunks) and out["recomputed"] > 0  # W last: every slot held
    assert set(got) == set(base)
    assert rel_err(got, base) < 1e-12 and rel_err(got, ref) < 1e-10


# ---- the command line: parallel.split_backward=true (torchrun, gloo) trains like one process ------------------

@pytest.fixture(scope="module")
def cli_one(tmp_path_factory):
    """Data, model, the common arguments, and the exported weights of one process after 2 AdamW steps (float64)."""
    from conftest import make_hf_model
    from multiproc import run_train, write_token_records

    d = tmp_path_factory.mktemp("cli")
    make_hf_model(tie=True, dtype=torch.float32, seed=7, std=0.1, layers=4).save_pretrained(d / "tied")
    write_token_records(d / "data.jsonl")
    common = [f"model.pretrained={d / 'tied'}", f"data.path={d / 'data.jsonl'}", f"data.cache_dir={d / 'cache'}",
              "data=jsonl", "data.global_batch_size=7", "data.shuffle=false", "chunk.size=32",
              "trainer.precision=64-true", "model.loss_chunk=16", "optim=adamw", "optim.lr=1e-3",
              "optim.warmup_steps=0", "callbacks.checkpoint=null", "trainer.max_steps=2"]
    run_train(1, d / "one", *common, "chunk.k=1", f"export.hf_dir={d / 'one' / 'export'}")
    return common, exported_weights(d / "one")


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((run / "export").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def assert_same_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-8) -> None:
    assert set(got) == set(ref)
    for k in ref:
        err = float((got[k] - ref[k]).abs().max() / ref[k].abs().max())
        assert err < rtol, f"{k}: relative difference {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("virtual", [1, 2])  # 2: parallel.virtual_stages=2, 4 blocks of one layer each
def test_cli_pp2_split_backward_trains_like_one_process_with_adamw(cli_one, tmp_path, virtual):
    import json

    from multiproc import run_train

    common, w1 = cli_one
    run_train(2, tmp_path, *common, "chunk.k=2", f"export.hf_dir={tmp_path / 'export'}", "parallel=pp2",
              f"parallel.virtual_stages={virtual}", "parallel.split_backward=true",
              "callbacks.timeline.every_n_train_steps=1", timeout=120)
    assert_same_weights(exported_weights(tmp_path), w1)
    # every split backward's W ran (on each block, with virtual stages), and the timeline recorded it as its own op
    for path in sorted((tmp_path / "timeline").glob("step_*.json")):
        rec = json.loads(path.read_text())
        assert "(in)" in rec["plan"] and "replayed" in rec and path.with_name(f"{path.stem}_sim.png").exists()
        for st in rec["stages"]:
            ops = [(e[0], e[1], e[4] if virtual > 1 else None) for e in st["events"]]
            assert sorted(c for op, *c in ops if op == "weight") == sorted(c for op, *c in ops if op == "backward")
            assert len({blk for _, _, blk in ops}) == virtual


@pytest.mark.slow
def test_cli_fsdp2_every_backward_split_backward_trains_like_one_process(cli_one, tmp_path):
    """dp_shard=2 reducing after every chunk: each reduce follows the chunk's W (its gradient complete only then)."""
    from multiproc import run_train

    common, w1 = cli_one
    run_train(2, tmp_path, *common, "chunk.k=1", f"export.hf_dir={tmp_path / 'export'}", "parallel.dp_shard=2",
              "parallel.grad_reduce=every_backward", "parallel.split_backward=true", timeout=120)
    assert_same_weights(exported_weights(tmp_path), w1)


def test_after_backward_runs_after_the_weight_action_when_split(setup):
    """A sharded stage reduces in ``after_backward``: after a split chunk's W (its gradient is complete only then),
    after an unsplit chunk's B."""
    _, split, batch, _, _ = setup
    acts = split_plan(batch, 1, "lag")
    ex = ChunkExecutor(split, batch, torch.device("cpu"), clock=lambda: 0.0)
    ex.after_backward = lambda: ex.events.append(("after_backward", -1, 0.0, 0.0))
    split.zero_grad(set_to_none=True)
    ex.run(acts)
    ops = [op for op, *_ in ex.events]
    assert ops.count("after_backward") == ops.count("weight") == len(batch.chunks)
    # the hook runs inside its action, whose event is recorded when the action ends: right after the hook's
    assert all(ops[i + 1] == "weight" for i, op in enumerate(ops) if op == "after_backward")
    ex = ChunkExecutor(split, batch, torch.device("cpu"), clock=lambda: 0.0)
    ex.after_backward = lambda: ex.events.append(("after_backward", -1, 0.0, 0.0))
    ex.run(unsplit(batch, 1))
    ops = [op for op, *_ in ex.events]
    assert all(ops[i + 1] == "backward" for i, op in enumerate(ops) if op == "after_backward")
    assert ops.count("after_backward") == len(batch.chunks)


def test_what_split_backward_does_not_run_with_is_refused_at_start(setup):
    from chunkflow_pl.config import ParallelConfig
    from chunkflow_pl.strategy.chunkflow import ChunkFlowStrategy
    from chunkflow_pl.strategy.split_backward import apply_split_backward

    with pytest.raises(ValueError, match=r"parallel.split_backward=true with chunk.layer_checkpoint=full"):
        ChunkFlowStrategy(ParallelConfig(pp=2, split_backward=True), layer_checkpoint="full", preemption=False)
    assert ChunkFlowStrategy(ParallelConfig(pp=2, split_backward=True), preemption=False).split_backward
    plain = setup[0]
    from chunkflow_pl.model.config import LoraSettings

    lora = Qwen2Decoder(plain.cfg).double()
    lora.lora = LoraSettings(rank=2)
    with pytest.raises(ValueError, match=r"parallel.split_backward=true with model.lora"):
        apply_split_backward(lora)
    with pytest.raises(ValueError, match=r"parallel.split_backward=true with data parallelism in torch.bfloat16"):
        apply_split_backward(Qwen2Decoder(plain.cfg), sharded_param_dtype=torch.bfloat16)


def test_timeline_draws_weight_actions_in_their_own_colour(tmp_path):
    from PIL import Image

    from chunkflow_pl.schedule.timeline import COLORS, TimedEvent, ascii_timeline, draw_timeline

    def count(pixels, hex_color):
        rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
        return sum(1 for p in pixels if p[:3] == rgb)

    events = [TimedEvent(0, "forward", 0, 0.0, 2.0), TimedEvent(0, "backward", 0, 2.0, 4.0),
              TimedEvent(0, "weight", 0, 4.0, 6.0)]
    assert ascii_timeline(events, 1).splitlines()[1].split()[2:] == ["F0", "F0", "B0", "B0", "W0", "W0"]
    path = draw_timeline(events, tmp_path / "w.png", 1, labels=False, legend=False, dpi=50)
    with Image.open(path) as img:
        pixels = list(img.convert("RGB").getdata())
    w, b = count(pixels, COLORS["weight"]), count(pixels, COLORS["backward"])
    assert w > 0 and w == pytest.approx(b, rel=0.05) and COLORS["weight"] not in (COLORS["backward"], COLORS["idle"])


def test_under_bf16_autocast_split_linear_is_nn_linear_bit_for_bit():
    """bf16-mixed: SplitLinear multiplies what F.linear under autocast would (casted input and weight), so an
    unsplit step gives nn.Linear's bits, and a split one (W at the end, B order) the same bits again."""
    cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    plain = Qwen2Decoder(cfg, loss_chunk=8)
    plain.reset_parameters()
    split = Qwen2Decoder(cfg, loss_chunk=8)
    split.load_state_dict(plain.state_dict())
    apply_split_linear(split)
    batch = make_batch(cfg)[2]

    def autocast_grads(model, actions):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return grads(model, batch, actions)[0]

    ref = autocast_grads(plain, unsplit(batch, 1))
    for got in (autocast_grads(split, unsplit(batch, 1)), autocast_grads(split, split_plan(batch, 1, "end"))):
        assert all(got[n].dtype == torch.float32 and torch.equal(got[n], ref[n]) for n in ref)
