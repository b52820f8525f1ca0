"""Per-layer activation checkpointing (``chunk.layer_checkpoint=full``): the same step bit for bit, the state
store and the prefix mover used once per chunk pass, parameter names unchanged, and less memory kept.

Float64 throughout the exactness tests: ``full`` must equal ``none`` bit for bit (the recompute runs the same
kernels on the same inputs), gradients and the weights after one SGD step, and both equal transformers'.
"""

from __future__ import annotations

import copy

import pytest
import test_chunk_exactness as exactness
import torch
from copy_standin import StandinCopyEngine
from test_chunk_exactness import CHUNK, _chunks, _waits, assert_same, chunked_grads
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from chunkflow_pl.model.attention import VarlenMeta
from chunkflow_pl.model.config import ModelConfig, get_preset
from chunkflow_pl.model.decoder import DecoderLayer, Qwen2Decoder
from chunkflow_pl.model.memory import activation_bytes_per_token_layer, estimate_training_memory
from chunkflow_pl.schedule.state import StateStore
from chunkflow_pl.strategy.layer_checkpoint import CheckpointedDecoderLayer, apply_layer_checkpoint


@pytest.fixture(scope="module")
def exactness_case(tmp_path_factory):
    """test_chunk_exactness's case (float64 model, long-tail sequences, transformers' gradient), built here."""
    return exactness.setup.__wrapped__(tmp_path_factory)


def checkpointed(model: Qwen2Decoder, policy: str = "full") -> Qwen2Decoder:
    out = copy.deepcopy(model)
    apply_layer_checkpoint(out, policy)
    return out


class Counts:
    """Calls into the state store and of the plain layer forward (``DecoderLayer.forward``, which a
    checkpointed layer calls once in forward and once more when backward recomputes it)."""

    def __init__(self, monkeypatch) -> None:
        self.writes = self.grads = self.layer_grad = self.layer_nograd = 0
        write, add, fwd = StateStore.write, StateStore.add_grad, DecoderLayer.forward
        add_from = StateStore.add_grad_from

        def count_write(store, *a, **kw):
            self.writes += 1
            return write(store, *a, **kw)

        def count_add(store, *a, **kw):
            self.grads += 1
            return add(store, *a, **kw)

        def count_add_from(store, *a, **kw):
            self.grads += 1
            return add_from(store, *a, **kw)

        def count_forward(layer, *a, **kw):
            if torch.is_grad_enabled():
                self.layer_grad += 1
            else:
                self.layer_nograd += 1
            return fwd(layer, *a, **kw)

        monkeypatch.setattr(StateStore, "write", count_write)
        monkeypatch.setattr(StateStore, "add_grad", count_add)
        monkeypatch.setattr(StateStore, "add_grad_from", count_add_from)
        monkeypatch.setattr(DecoderLayer, "forward", count_forward)

    def take(self) -> tuple[int, int, int, int]:
        out = (self.writes, self.grads, self.layer_grad, self.layer_nograd)
        self.writes = self.grads = self.layer_grad = self.layer_nograd = 0
        return out


def sgd_step(model: Qwen2Decoder, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: (p.detach() - 0.5 * grads[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size,k,offload", [(64, 1, "device"), (64, 1, "host"), (64, 1, "mover"),
                                                   (40, 2, "mover"), (24, 100, "host")])
def test_full_gives_the_bits_of_none_and_touches_the_store_once(exactness_case, monkeypatch, chunk_size, k, offload):
    """One SGD step with layer checkpointing equals the one without, bit for bit, for sequences split into
    up to 14 chunks (prefixes and state gradients), with dropped/recomputed chunks (k=1, 2) and without
    (k=100), state on the device, on the host, and moved by a copy engine (the CUDA path, on the CPU
    stand-in). The store sees the same writes and prefix-gradient adds; every grad-enabled layer forward
    (kept chunks and chunk recomputes, not the dropped no-grad ones) runs exactly once more, in backward."""
    model, seqs, targets, n_label, ref, _ = exactness_case
    counts = Counts(monkeypatch)
    runs = {}
    for policy in ("none", "full"):
        m = checkpointed(model, policy)
        engine = StandinCopyEngine() if offload == "mover" else None
        grads, stats = chunked_grads(m, seqs, targets, n_label, chunk_size, k=k, offload=offload != "device",
                                     engine=engine)
        runs[policy] = grads, stats, sgd_step(m, grads), counts.take()
    (g0, s0, w0, c0), (g1, s1, w1, c1) = runs["none"], runs["full"]
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name
        assert torch.equal(w1[name], w0[name]), name
    assert s1.loss_sum == s0.loss_sum and s1.recomputed_chunks == s0.recomputed_chunks
    assert (s0.recomputed_chunks > 0) == (k < 100)
    assert_same(g1, ref)
    writes, adds, grad_fwd, nograd_fwd = c0
    assert writes > 0 and adds > 0 and grad_fwd > 0 and (nograd_fwd > 0) == (k < 100)
    assert c1 == (writes, adds, 2 * grad_fwd, nograd_fwd), (c0, c1)


def test_prefix_mover_serves_a_recomputed_layer_the_copy_its_backward_uses():
    """With a prefix mover (offloaded state on CUDA; here the CPU stand-in, which fails a copy read before it
    lands), a layer recomputed in backward fetches its prefix again. That copy is the one its attention
    backward then uses: per pass the first layer is copied cold and the others one layer ahead, no copy is
    started and left unused, the device holds at most two layers' prefixes, and each prefix gradient goes
    to the store once: the same pattern as without layer checkpointing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_layers=4, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=512)
    model = Qwen2Decoder(cfg, loss_chunk=8).double()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in [70, 9, 33]]
    targets = [s.clone() for s in seqs]
    for t in targets:
        t[:-1], t[-1] = t[1:].clone(), -100
    n_label = sum(int((t != -100).sum()) for t in targets)
    prefixed = sum(1 for c in _chunks(seqs) for s in c if s.start > 0 and s.length > 0)
    passes = 2 * sum(1 for c in _chunks(seqs) if any(s.start > 0 and s.length > 0 for s in c))
    plain, _ = chunked_grads(model, seqs, targets, n_label, CHUNK, k=100)
    full = checkpointed(model)
    engine = StandinCopyEngine()
    got, stats = chunked_grads(full, seqs, targets, n_label, CHUNK, k=100, offload=True, engine=engine)
    for name in got:
        assert torch.equal(got[name], plain[name]), name
    assert stats.recomputed_chunks == 0
    assert _waits(engine.log) == (3 * passes, passes, 0)
    assert not any(op == "release" for op, _ in engine.log)
    assert engine.max_alive == 2
    assert sum(op == "to_host" for op, _ in engine.log) == 2 * cfg.num_layers * prefixed


def test_parameter_names_modules_and_hooks_are_unchanged():
    cfg = get_preset("tiny", num_layers=3)
    model = Qwen2Decoder(cfg)
    names, modules = [n for n, _ in model.named_parameters()], [n for n, _ in model.named_modules()]
    keys = list(model.state_dict())
    apply_layer_checkpoint(model, "none")
    assert all(type(layer) is DecoderLayer for layer in model.layers.values())  # none: nothing changes
    apply_layer_checkpoint(model, "full")
    apply_layer_checkpoint(model, "full")  # twice is once
    assert all(type(layer) is CheckpointedDecoderLayer for layer in model.layers.values())
    assert [n for n, _ in model.named_parameters()] == names and "layers.2.attn.q_proj.weight" in names
    assert [n for n, _ in model.named_modules()] == modules and list(model.state_dict()) == keys
    assert copy.deepcopy(model).layers["1"].__class__ is CheckpointedDecoderLayer
    # Forward hooks (FSDP2 shards and gathers through them) still fire around each layer, once per call.
    fired = []
    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(lambda mod, args, name=name: fired.append(("pre", name)))
        layer.register_forward_hook(lambda mod, args, out, name=name: fired.append(("post", name)))
    ids = torch.randint(0, cfg.vocab_size, (8,))
    hidden, _ = model(ids, torch.arange(8), VarlenMeta.from_lengths([8]))
    model.loss_sum(hidden, ids).backward()
    assert fired == [(w, n) for n in model.layer_names for w in ("pre", "post")]
    with pytest.raises(ValueError, match=r"chunk\.layer_checkpoint='some' must be one of none, full"):
        apply_layer_checkpoint(model, "some")


class _LiveStorages(TorchDispatchMode):
    """Every storage an op creates while active; ``live`` sums those still referenced (by autograd's saved
    tensors, by checkpoint's kept inputs, or by outputs the caller holds)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[int, int, StorageWeakRef]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.made.append((s.data_ptr(), s.nbytes(), StorageWeakRef(s)))
        return out

    def live(self, skip: set[int]) -> int:
        # addresses are reused once freed: only live storages are told apart by address (views share one)
        alive = {p: n for p, n, ref in self.made if not ref.expired() and p not in skip}
        return sum(alive.values())


def kept_chunk_bytes(cfg: ModelConfig, policy: str, tokens: int) -> tuple[int, int]:
    """(bytes a kept chunk's forward leaves alive until its backward, bytes autograd's saved-tensor hooks see):
    the forward as the executor runs it (keys/values returned and held, the loss), parameters excluded."""
    torch.manual_seed(0)
    model = checkpointed(Qwen2Decoder(cfg, loss_chunk=tokens // 2), policy)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (tokens,))
    with _LiveStorages() as track, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden, kv = model(ids, torch.arange(tokens), VarlenMeta.from_lengths([tokens]), return_kv=True)
        loss = model.loss_sum(hidden, ids)
    del hidden
    live = track.live(params)
    loss.backward()  # the graph is complete and runs
    return live, sum(n for p, n in saved.items() if p not in params)


def test_full_keeps_per_layer_only_the_input_and_the_keys_values():
    """Measured on the tiny preset (4 layers, hidden 128, fp32), one kept 256-token chunk: what its forward
    leaves alive per token and layer is what the memory estimate counts (none: ``activation_bytes_per_token_
    layer``; full: the input [T, D] and the new K/V), from the difference of a 4- and a 2-layer model
    (measured 10264 vs 1024 bytes: 10x per layer; 12.5 vs 3.1 MB for the whole chunk with its head)."""
    T, cfg4, cfg2 = 256, get_preset("tiny", num_layers=4), get_preset("tiny", num_layers=2)
    live, saved = {}, {}
    for policy in ("none", "full"):
        (l4, s4), (l2, _) = kept_chunk_bytes(cfg4, policy, T), kept_chunk_bytes(cfg2, policy, T)
        live[policy], saved[policy] = l4, s4
        per_layer = (l4 - l2) / (2 * T)
        assert per_layer == pytest.approx(activation_bytes_per_token_layer(cfg4, "32-true", policy), rel=0.01)
    assert live["full"] < live["none"] / 3  # the whole chunk, head and loss included (measured: 4.1x)
    # autograd's own hooks see even less: checkpoint keeps the layer inputs itself, not as saved tensors
    assert saved["full"] < live["full"] < saved["none"]
    d, kv = cfg4.hidden_size, 2 * cfg4.num_kv_heads * cfg4.head_dim
    assert activation_bytes_per_token_layer(cfg4, "32-true", "full") == (d + kv) * 4
    none_est, full_est = (estimate_training_memory(cfg4, 4096, 2, "32-true", layer_checkpoint=p)
                          for p in ("none", "full"))
    assert full_est.activations < none_est.activations and full_est.weights == none_est.weights


def test_train_py_step_with_full_equals_none(tmp_path):
    """``train.py chunk.layer_checkpoint=full``, one process, float64, one SGD step over a batch with a
    200-token sequence in 7 chunks of 32 (k=1: all but its last chunk recomputed): the same loss and the
    same exported weights, bit for bit, as ``none`` (which test_train_app.py holds to transformers' step)."""
    import test_train_app as app
    from conftest import make_hf_model

    make_hf_model(tie=False, dtype=torch.float32, seed=5, std=0.1).save_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    app.write_jsonl(tmp_path / "data.jsonl", [torch.randint(0, 97, (n,), generator=g) for n in (7, 200, 33, 2)])
    runs = {}
    for policy in ("none", "full"):
        out = tmp_path / policy
        cfg = app.compose_cfg(out, "optim=sgd", "optim.lr=1", "optim.weight_decay=0", "optim.grad_clip=0",
                              "trainer.precision=64-true", "trainer.max_steps=1", "trainer.accelerator=cpu",
                              f"export.hf_dir={out / 'export'}", f"model.pretrained={tmp_path / 'hf'}", "data=jsonl",
                              f"data.path={tmp_path / 'data.jsonl'}", "data.global_batch_size=4",
                              "data.shuffle=false", f"data.cache_dir={tmp_path / 'cache'}", "chunk.size=32",
                              "chunk.k=1", f"chunk.layer_checkpoint={policy}")
        result = app.train(cfg)
        layers = result["module"].model.layers.values()
        assert all(isinstance(m, CheckpointedDecoderLayer) == (policy == "full") for m in layers)
        runs[policy] = (float(result["trainer"].callback_metrics["train/loss"]),
                        app.load_file(str(out / "export" / "model.safetensors")))
    (loss0, w0), (loss1, w1) = runs["none"], runs["full"]
    assert loss1 == loss0
    assert set(w1) == set(w0)
    for name in w0:
        assert w0[name].dtype == torch.float64 and torch.equal(w1[name], w0[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_engine_with_layer_checkpointing_gives_the_bits_of_device_state(exactness_case):
    """The real copy engine on CUDA (side streams, events, worker adds), float64, k=1: layer checkpointing with
    offloaded state equals device-resident state without it, bit for bit, also with every side-stream copy
    delayed by a GPU sleep (a recompute that read a copy before it landed would change the result)."""
    from single_device_oracle import plan_single_device

    from chunkflow_pl.data.assemble import assemble_step
    from chunkflow_pl.data.packing import build_chunk_plan
    from chunkflow_pl.schedule.executor import ChunkExecutor
    from chunkflow_pl.schedule.offload import CudaCopyEngine

    class SlowCopies(CudaCopyEngine):
        def to_device(self, host):
            with torch.cuda.stream(self.h2d):
                torch.cuda._sleep(20_000_000)
            return super().to_device(host)

    model, seqs, targets, n_label, _, _ = exactness_case
    cuda = torch.device("cuda", torch.cuda.current_device())
    plan = build_chunk_plan([len(s) for s in seqs], CHUNK)
    batch = assemble_step(plan.chunks, seqs, targets, [len(s) for s in seqs], list(range(len(seqs))), n_label, 0,
                          len(plan.chunks))
    actions = plan_single_device([c.segments for c in batch.chunks], batch.seq_lens, 1)
    grads = {}
    for run, policy, offload, engine in (("device", "none", False, None), ("engine", "full", True, None),
                                         ("slow", "full", True, SlowCopies(cuda))):
        m = checkpointed(model, policy).to(cuda)
        m.zero_grad(set_to_none=True)
        ChunkExecutor(m, batch, cuda, offload_state=offload, copy_engine=engine).run(actions)
        grads[run] = {n: p.grad.cpu() for n, p in m.named_parameters()}
    for name in grads["device"]:
        assert torch.equal(grads["engine"][name], grads["device"][name]), name
        assert torch.equal(grads["slow"][name], grads["device"][name]), name
