"""State-aware chunk execution gives exactly the gradient of whole-sequence training (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model
from single_device_oracle import plan_single_device

from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained, to_hf_name
from chunkflow_pl.schedule.executor import ChunkExecutor

CHUNK = 16
LENS = [5, 40, 13, 1, 320, 33, 16, 17]  # short ones, 2x-20x CHUNK, exactly CHUNK, CHUNK + 1


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
    labels[1][:10] = -100  # an unsupervised prompt
    targets = [targets_from_labels(s, y) for s, y in zip(seqs, labels)]
    n_label = sum(int((t != -100).sum()) for t in targets)
    # Reference: transformers on each whole sequence, loss = summed CE / supervised tokens.
    hf.zero_grad()
    total = sum(F.cross_entropy(hf(s[None]).logits[0], t, ignore_index=-100, reduction="sum")
                for s, t in zip(seqs, targets))
    (total / n_label).backward()
    ref = {name: hf.get_parameter(to_hf_name(name)).grad.clone() for name, _ in model.named_parameters()}
    return model, seqs, targets, n_label, ref, float(total)


def chunked_grads(model, seqs, targets, n_label, chunk_size, k, offload=False, engine=None):
    plan = build_chunk_plan([len(s) for s in seqs], chunk_size)
    batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))), n_label, 0,
                          len(plan.chunks))
    model.zero_grad()
    actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k)
    stats = ChunkExecutor(model, batch, torch.device("cpu"), offload_state=offload, copy_engine=engine).run(actions)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats


def assert_same(got, ref, rtol=1e-10):
    for name, g in got.items():
        err = (g - ref[name]).norm() / ref[name].norm().clamp_min(1e-300)
        assert err < rtol, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("chunk_size", [16, 24, 64, 320])
def test_any_chunk_size_matches_transformers(setup, chunk_size):
    model, seqs, targets, n_label, ref, total = setup
    got, stats = chunked_grads(model, seqs, targets, n_label, chunk_size, k=1)
    assert_same(got, ref)
    assert stats.loss_sum == pytest.approx(total, rel=1e-12)
    assert stats.tokens == sum(LENS)


def test_every_k_and_offload_give_the_same_gradient(setup):
    model, seqs, targets, n_label, ref, _ = setup
    chain = -(-max(LENS) // CHUNK)
    for k in range(1, chain + 1, 4):
        got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=k)
        assert_same(got, ref)
        assert stats.max_live_activations <= k
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=chain)
    assert_same(got, ref)
    assert stats.recomputed_chunks == 0
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=2, offload=True)
    assert_same(got, ref)
    _, kept = chunked_grads(model, seqs, targets, n_label, CHUNK, k=2)
    assert stats.peak_state_bytes == kept.peak_state_bytes  # offloading moves the state, it does not resize it
    cfg = model.cfg  # at least the float64 keys and values of the longest split sequence, every layer
    assert stats.peak_state_bytes >= max(LENS) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 8


def test_recompute_is_bit_identical(setup):
    """k=1 (recompute everything) and k=chain length (recompute nothing) agree bit for bit."""
    model, seqs, targets, n_label, _, _ = setup
    a, sa = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1)
    b, sb = chunked_grads(model, seqs, targets, n_label, CHUNK, k=100)
    assert sa.recomputed_chunks > 0 and sb.recomputed_chunks == 0
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("package", ["flash-attn", "flash-attn-4"])
def test_flash_path_through_the_executor_matches_transformers(setup, monkeypatch, package):
    """model.attention=flash (flash-attn 2's or flash-attn-4's contract, on CPU through ``flash_standin``) gives
    the transformers gradient, with recompute and state offload; the batch holds a chunk with two prefixed
    one-token tails among unprefixed segments. (On CPU, offload keeps the same storage: the GPU check measures
    the rest.)"""
    import flash_standin

    calls = (flash_standin.install_cute if package == "flash-attn-4" else flash_standin.install)(monkeypatch)
    model, seqs, targets, n_label, ref, total = setup
    monkeypatch.setattr(model, "attention_backend", "flash")
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1, offload=True)
    assert_same(got, ref)
    assert stats.loss_sum == pytest.approx(total, rel=1e-12)
    # chunk [2[0:13) 3[0:1) 5[32:33) 7[16:17)]: one causal call over its 4 segments, one unmasked call per
    # tail (1 query x 2 heads per kv head against a 32- and a 16-token prefix), forward and backward
    assert {(c["op"], c["batch"]) for c in calls if c["causal"] and c["rows"] == 16} >= {("fwd", 4), ("bwd", 4)}
    assert {(c["op"], c["rows"], c["keys"]) for c in calls if not c["causal"]} >= {("fwd", 2, 32), ("fwd", 2, 16),
                                                                                  ("bwd", 2, 32), ("bwd", 2, 16)}
    assert {c.get("package", "flash-attn") for c in calls} == {package}


def test_kv_only_forward_gives_the_same_state_bits(setup):
    # A dropped forward fills the state store through kv_only (the last layer stops after k/v): the keys and
    # values must be exactly those of the full forward, which the recompute of that chunk produces.
    model = setup[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (12,), generator=g)
    meta = VarlenMeta.from_lengths([12], [20])
    prefix = [tuple(torch.randn(20, model.cfg.num_kv_heads, model.cfg.head_dim, generator=g, dtype=torch.float64)
                    for _ in range(2)) for _ in model.layer_names]
    with torch.no_grad():
        full_h, full_kv = model(ids, torch.arange(20, 32), meta, prefix, return_kv=True)
        none_h, kv = model(ids, torch.arange(20, 32), meta, prefix, return_kv=True, kv_only=True)
    assert none_h is None and full_h is not None
    assert len(kv) == len(full_kv) == len(model.layer_names)
    for (k, v), (fk, fv) in zip(kv, full_kv):
        assert torch.equal(k, fk) and torch.equal(v, fv)
    with pytest.raises(ValueError, match="kv_only needs return_kv"):
        model(ids, torch.arange(20, 32), meta, prefix, kv_only=True)


def _waits(log):
    """Split the stand-in's waits into those whose copy was started while an earlier layer was still
    being computed (``ahead``: another wait lies between its issue and it) and ``cold`` ones."""
    issued, ahead, cold, last_wait = {}, 0, 0, -1
    for pos, (op, key) in enumerate(log):
        if op == "issue":
            issued[key] = pos  # a copy never waited for is replaced by the next copy of that layer
        elif op == "wait":
            if issued.pop(key) < last_wait:
                ahead += 1
            else:
                cold += 1
            last_wait = pos
    never_waited = sum(op == "issue" for op, _ in log) - ahead - cold
    return ahead, cold, never_waited


@pytest.mark.parametrize("k", [1, 2])
def test_offload_copy_engine_gives_the_same_bits_and_transformers_gradient(setup, k):
    """``chunk.offload_state`` on CUDA moves prefixes and their gradients through a copy engine (side streams,
    one layer ahead; gradient adds on a worker). Through the CPU stand-in that enforces its contract (copies
    are NaN until waited for, gradient adds happen only when the store drains), a step is bit-identical to
    the one without offload (same adds in the same order) and equals transformers' gradient."""
    from copy_standin import StandinCopyEngine

    model, seqs, targets, n_label, ref, total = setup
    engine = StandinCopyEngine()
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=k, offload=True, engine=engine)
    plain, _ = chunked_grads(model, seqs, targets, n_label, CHUNK, k=k)
    for name in got:
        assert torch.equal(got[name], plain[name]), name
    assert_same(got, ref)
    assert stats.loss_sum == pytest.approx(total, rel=1e-12)
    ahead, cold, never_waited = _waits(engine.log)
    assert ahead > 0 and cold > 0
    assert engine.max_alive <= 2  # the layer in use and the next one
    # one gradient per prefix tensor per layer per backward: (k, v) x layers x prefixed segments
    chunks = _chunks(seqs)
    prefixed = sum(1 for c in chunks for s in c if s.start > 0 and s.length > 0)
    assert sum(op == "to_host" for op, _ in engine.log) == 2 * model.cfg.num_layers * prefixed
    # a dropped forward stops before its last layer's attention (kv_only): the copy started for that layer
    # is never waited for, and released when the pass ends
    actions = plan_single_device(chunks, [len(x) for x in seqs], k)
    dropped = sum(1 for a in actions if a.op.value == "forward" and not a.keep
                  and any(s.start > 0 and s.length > 0 for s in chunks[a.chunk]))
    assert dropped > 0 and never_waited == dropped == sum(op == "release" for op, _ in engine.log)


def test_offload_survives_saved_tensor_hooks_that_repack(setup):
    """Saved-tensor hooks (activation offloading such as ``save_on_cpu``) may hand backward other tensors
    than the ones forward saved. The prefix mover learns a chunk's layer in forward, from the views the
    executor passed, and backward asks it by that layer: under hooks that copy every saved tensor a step
    with offload is still bit-identical to one without."""
    from copy_standin import StandinCopyEngine

    model, seqs, targets, n_label, _, _ = setup
    plain, _ = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1)
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
        got, _ = chunked_grads(model, seqs, targets, n_label, CHUNK, k=1, offload=True, engine=StandinCopyEngine())
    for name in got:
        assert torch.equal(got[name], plain[name]), name


def _chunks(seqs):
    return build_chunk_plan([len(s) for s in seqs], CHUNK).chunks


def test_copy_engine_prefetches_every_layer_but_the_first_of_each_pass():
    """Four layers, every forward kept (k = chain): each pass over a prefixed chunk (forward, backward) waits
    for its first layer cold and finds the other three already copied; the device never holds more than two
    layers' prefixes, and a step through the engine is bit-identical to one without offload."""
    from copy_standin import StandinCopyEngine

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=4, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    g = torch.Generator().manual_seed(1)
    lens = [70, 9, 33]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    targets = [targets_from_labels(s, s.clone()) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    engine = StandinCopyEngine()
    got, stats = chunked_grads(model, seqs, targets, n_label, CHUNK, k=100, offload=True, engine=engine)
    plain, _ = chunked_grads(model, seqs, targets, n_label, CHUNK, k=100)
    for name in got:
        assert torch.equal(got[name], plain[name]), name
    assert stats.recomputed_chunks == 0
    passes = 2 * sum(1 for c in _chunks(seqs) if any(s.start > 0 and s.length > 0 for s in c))
    assert _waits(engine.log) == (3 * passes, passes, 0)
    assert not any(op == "release" for op, _ in engine.log)
    assert engine.max_alive == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 2])
def test_cuda_copy_engine_gives_the_bits_of_device_state(setup, k):
    """The real engine (side streams, events, worker adds) on CUDA, float64: offloaded state gives the bits
    of device-resident state and transformers' gradient; also with every side-stream copy delayed by a GPU
    sleep, so that a missing stream/event wait reads a copy before it lands and changes the result."""
    from chunkflow_pl.schedule.offload import CudaCopyEngine

    class SlowCopies(CudaCopyEngine):
        def to_device(self, host):
            with torch.cuda.stream(self.h2d):
                torch.cuda._sleep(20_000_000)
            return super().to_device(host)

        def to_host(self, dev, then):
            with torch.cuda.stream(self.d2h):
                torch.cuda._sleep(20_000_000)
            super().to_host(dev, then)

    model, seqs, targets, n_label, ref, _ = setup
    cuda = torch.device("cuda", torch.cuda.current_device())
    model = model.to(cuda)
    try:
        plan = build_chunk_plan([len(s) for s in seqs], CHUNK)
        batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))),
                              n_label, 0, len(plan.chunks))
        actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, k)
        grads = {}
        for run, offload, engine in (("device", False, None), ("engine", True, None),
                                     ("slow", True, SlowCopies(cuda))):
            model.zero_grad()
            ex = ChunkExecutor(model, batch, cuda, offload_state=offload, copy_engine=engine)
            assert isinstance(ex.copy_engine, CudaCopyEngine) == offload
            ex.run(actions)
            grads[run] = {n: p.grad.cpu() for n, p in model.named_parameters()}
        for name in grads["device"]:
            assert torch.equal(grads["engine"][name], grads["device"][name]), name
            assert torch.equal(grads["slow"][name], grads["device"][name]), name
        assert_same(grads["engine"], ref)
    finally:
        model.cpu()
        model.zero_grad()
