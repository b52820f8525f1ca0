"""Stage-ready model and executor (issue 8, item 4): a model split into pipeline stages, run stage after
stage in one process through a local transport, gives the unsplit model's gradients exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model
from single_device_oracle import plan_single_device

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.model.stages import StageSpec, split_stages
from chunkflow_pl.schedule.executor import ChunkExecutor
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.transport import LocalTransport

LENS = [5, 40, 13, 1, 90, 33, 16, 17]
CHUNK = 16


def test_split_stages_covers_every_layer_once():
    for n in range(1, 9):
        for pp in range(1, n + 1):
            stages = split_stages(n, pp)
            layers = [i for s in stages for i in s.layer_ids]
            assert layers == list(range(n))
            assert stages[0].takes_ids and stages[-1].has_head
            assert sum(s.takes_ids for s in stages) == 1 and sum(s.has_head for s in stages) == 1
            sizes = [len(s.layer_ids) for s in stages]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="parallel.pp=5 is larger than the model's 4 layers"):
        split_stages(4, 5)


def run_pipelined_in_process(stages, batch, k):
    """Drive every stage through the single-device plan, one stage after the other, via mailboxes."""
    link = [LocalTransport() for _ in stages[:-1]]  # link[s]: between stage s and s + 1
    ex = []
    for s, m in enumerate(stages):
        # a stage talks to both neighbours; one mailbox per boundary, shared by its two ends
        ex.append(ChunkExecutor(m, batch, torch.device("cpu"), transport=_Both(link, s)))
    last = len(stages) - 1
    for a in plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k):
        if a.op is Op.FORWARD:
            for s in range(len(stages)):
                if s > 0:
                    ex[s].recv_act(a.chunk)
                ex[s].forward(a.chunk, a.keep)
                if s < last:
                    ex[s].send_act(a.chunk)
        elif a.op is Op.RECOMPUTE:
            for s in range(len(stages)):
                ex[s].recompute(a.chunk)
        else:
            for s in reversed(range(len(stages))):
                if s < last:
                    ex[s].recv_grad(a.chunk)
                ex[s].backward(a.chunk)
                if s > 0:
                    ex[s].send_grad(a.chunk)
    for t in link:
        t.flush()
    return ex


class _Both:
    """Stage s sends activations on link s, gradients on link s - 1 (and receives the other way)."""

    def __init__(self, links, s):
        self.links, self.s = links, s

    def _link(self, kind, sending):
        forward = (kind == "act") == sending
        return self.links[self.s if forward else self.s - 1]

    def send(self, kind, chunk, t):
        self._link(kind, True).send(kind, chunk, t)

    def recv(self, kind, chunk, shape, dtype, device):
        return self._link(kind, False).recv(kind, chunk, shape, dtype, device)

    def flush(self):
        pass


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pp,k", [(2, 1), (3, 2)])
def test_stages_in_one_process_give_the_unsplit_gradient(tmp_path, tie, pp, k):
    hf = make_hf_model(tie=tie, dtype=torch.float64, seed=4, layers=3)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in LENS]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(LENS, CHUNK)
    batch = assemble_step(plan.chunks, seqs, targets, LENS, list(range(len(LENS))), n_label, 0, len(plan.chunks))

    whole = Qwen2Decoder(cfg, loss_chunk=8).double()
    load_pretrained(whole, tmp_path, cfg)
    actions = plan_single_device([c.segments for c in batch.chunks], LENS, k)
    ref_stats = ChunkExecutor(whole, batch, torch.device("cpu")).run(actions)
    ref = {n: p.grad for n, p in whole.named_parameters()}

    stages = []
    for spec in split_stages(cfg.num_layers, pp):
        m = Qwen2Decoder(cfg, loss_chunk=8, stage=spec).double()
        load_pretrained(m, tmp_path, cfg)
        stages.append(m)
    ex = run_pipelined_in_process(stages, batch, k)

    got: dict[str, torch.Tensor] = {}
    for m in stages:
        for n, p in m.named_parameters():
            got[n] = got[n] + p.grad if n in got else p.grad  # a tied head: embed.weight on two stages
    assert set(got) == set(ref)
    for n in ref:
        err = float((got[n] - ref[n]).abs().max() / ref[n].abs().max())
        assert err < 1e-12, f"{n}: {err:.2e}"
    assert ex[-1].stats.loss_sum == pytest.approx(ref_stats.loss_sum, rel=1e-14)
    names = [set(n for n, _ in m.named_parameters()) for m in stages]
    assert all(a.isdisjoint(b) or a & b == {"embed.weight"} for i, a in enumerate(names) for b in names[i + 1:])


def test_stage_without_head_or_embedding_has_only_its_layers():
    cfg = ModelConfig(num_layers=4)
    m = Qwen2Decoder(cfg, stage=StageSpec(1, 3, takes_ids=False, has_head=False))
    assert sorted({n.split(".")[1] for n, _ in m.named_parameters()}) == ["1", "2"]
    assert m.embed is None and m.norm is None and m.lm_head is None
    with pytest.raises(RuntimeError, match="no LM head"):
        _ = m.head_weight


@pytest.mark.parametrize("tie", [False, True])
def test_stage_memory_counts_the_parameters_each_stage_builds(tie):
    from chunkflow_pl.model.memory import estimate_training_memory, stage_params

    cfg = ModelConfig(num_layers=5, tie_word_embeddings=tie)
    for pp in (1, 2, 3):
        for spec in split_stages(cfg.num_layers, pp):
            built = sum(p.numel() for p in Qwen2Decoder(cfg, stage=spec).parameters())
            assert stage_params(cfg, spec) == built, (pp, spec)
    whole = estimate_training_memory(cfg, 1024, 1, "32-true")
    first, last = (estimate_training_memory(cfg, 1024, 1, "32-true", stage=s, live_chunks=c)
                   for s, c in zip(split_stages(5, 2), (2, 1)))
    assert whole.params == cfg.num_params()
    # (per-stage activations are checked against autograd's saved tensors in tests/test_plan.py)
    assert first.params + last.params == cfg.num_params() + (cfg.vocab_size * cfg.hidden_size if tie else 0)
