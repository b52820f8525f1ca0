"""Back-of-envelope training memory, computed from the config before any weight is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from chunkflow_pl.config import GRAD_REDUCE
from chunkflow_pl.model.config import LoraSettings, ModelConfig
from chunkflow_pl.model.stages import StageSpec
from chunkflow_pl.utils.host_memory import available_host_bytes

GiB = 1024**3


def precision_bytes(precision: str) -> tuple[int, int]:
    """(bytes per weight, bytes per activation) for a Lightning precision string."""
    p = str(precision)
    if p.startswith("64"):
        return 8, 8
    if p.startswith("32"):
        return 4, 4
    if p.endswith("-mixed"):
        return 4, 2  # fp32 master weights, half-precision activations
    return 2, 2  # bf16-true / 16-true


@dataclass(frozen=True)
class Sharding:
    """How the data-parallel ranks of a stage hold its parameters (``strategy/sharding.py``, FSDP2; any data
    parallelism runs on it, replicate-only being a shard size of 1). ``dp_shard``: ranks parameters, gradients
    and optimizer state are sharded over; ``grad_reduce``: ``last_backward`` (an unsharded gradient accumulates
    over the step) or ``every_backward`` (reduced after each chunk's backward); ``reshard_after_forward``: free
    the gathered parameters after each unit's forward (an all-gather per unit per chunk) instead of holding
    them for the step."""

    dp_shard: int = 1
    dp_replicate: int = 1
    grad_reduce: str = "last_backward"
    reshard_after_forward: bool = False

    def __post_init__(self) -> None:
        for key, v in (("parallel.dp_shard", self.dp_shard), ("parallel.dp_replicate", self.dp_replicate)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}={v!r} must be a positive integer")
        if self.grad_reduce not in GRAD_REDUCE:
            raise ValueError(f"parallel.grad_reduce={self.grad_reduce!r} must be one of {', '.join(GRAD_REDUCE)}")

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 units exist at all (any data parallelism; ``ParallelDims.sharded``)."""
        return self.dp > 1


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's peak, by kind. ``weights``: what the optimizer updates (under FSDP2 this rank's shard of the
    master weights); ``gathered``: FSDP2's unsharded compute copy of the parameters; ``grads``: gradients held at
    the peak (unsharded accumulation and/or shards); ``buffers``: collective buffers at the peak; ``phase``:
    when the peak happens (``step``: among the chunks' actions; ``reduce``: the gradient reduce after the
    last backward, when activations and K/V state are gone but sharded and unsharded gradients coexist)."""

    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    state: int = 0  # K/V state of split sequences: keys/values + gradient accumulators
    gathered: int = 0
    buffers: int = 0
    phase: str = "step"

    @property
    def total(self) -> int:
        return (self.weights + self.gathered + self.grads + self.optimizer + self.activations + self.state
                + self.buffers)

    def table(self) -> str:
        rows = [("parameters", f"{self.params / 1e9:.3f} B"), ("weights", _g(self.weights))]
        if self.gathered or self.buffers:
            rows += [("gathered parameters", _g(self.gathered)), ("collective buffers", _g(self.buffers))]
        rows += [("gradients", _g(self.grads)), ("optimizer state", _g(self.optimizer)),
                 ("activations (chunk x k)", _g(self.activations)), ("K/V state", _g(self.state)),
                 ("total" if self.phase == "step" else f"total (peak at the {self.phase})", _g(self.total))]
        return "\n".join(f"  {k:<26}{v:>12}" for k, v in rows)


def _g(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def activation_bytes_per_token_layer(cfg: ModelConfig, precision: str, layer_checkpoint: str = "none") -> int:
    """Bytes autograd saves per token and decoder layer for backward (counted on ``Qwen2Decoder``).

    Per token: each RMSNorm keeps its input, the normalised input and its output (3 D, twice); attention
    keeps q and k after RoPE, v, and its output (also ``o_proj``'s input): 2 D + Dkv for k and v together,
    plus one fp32 log-sum-exp per query head; the MLP keeps gate, SiLU(gate), up and their product (4 F).
    ``tests/test_plan.py`` checks this count against the saved tensors of a real forward.
    ``layer_checkpoint="full"``: the layer keeps only its input (D) and its new keys/values (Dkv), which the
    state store needs anyway (``tests/test_layer_checkpoint.py`` measures both).
    """
    _, ab = precision_bytes(precision)
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, 2 * cfg.num_kv_heads * cfg.head_dim
    if layer_checkpoint == "full":
        return (d + kv) * ab
    return (8 * d + kv + 4 * f) * ab + 4 * cfg.num_heads


def estimate_stage_memory(cfg: ModelConfig, stage: StageSpec, chunk_size: int, live_chunks: int, precision: str,
                          optimizer: str = "adamw", loss_chunk: int = 4096, state_tokens: int = 0,
                          boundary_tokens: int = 0, layer_checkpoint: str = "none",
                          lora: LoraSettings | None = None, sharding: Sharding | None = None) -> MemoryEstimate:
    """Peak training memory of one pipeline stage (the whole model when ``stage`` is whole).

    ``live_chunks``: chunks holding activations at once (``k`` on one device; the stage's cap in a pipeline). With
    ``parallel.split_backward`` a chunk holds its slot until its weight action, and what it keeps from its backward
    until then (``model/split_linear.py``: 6D + 2Dkv + 3F per token and layer) is less than its activations (8D +
    2Dkv + 4F), so the same count covers it. ``state_tokens``: tokens of the split sequences whose key/value state
    is alive at once (the store allocates a whole sequence at its first write). ``boundary_tokens``: ``[T, D]``
    inputs kept by dropped forwards for their recompute (stages after the first). ``layer_checkpoint``: ``chunk.
    layer_checkpoint`` (``full``: live chunks keep per layer its input and K/V; the chunk in backward also holds one
    recomputed layer's activations). ``lora``: adapters on the stage's layers; then only they have gradients and
    optimizer state (the frozen weights only their weights). ``sharding``: the stage's data parallelism
    (``sharded_state``); None or one rank: plain tensors, no FSDP2.
    """
    wb, ab = precision_bytes(precision)
    n = stage_params(cfg, stage)
    adapters = lora.adapter_params(cfg, len(stage.layer_ids)) if lora is not None else 0
    trained = adapters if adapters else n
    opt_states = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    kv = 2 * cfg.num_kv_heads * hd
    layers = len(stage.layer_ids)
    per_token = layers * activation_bytes_per_token_layer(cfg, precision, layer_checkpoint) + 2 * hd * ab  # + RoPE
    if stage.has_head:
        per_token += 3 * d * ab  # final norm
    act = live_chunks * chunk_size * per_token
    # Transient at the peak, on top of what is saved: one layer's activation gradients during backward ...
    act += chunk_size * (2 * d + 3 * f) * ab
    if layer_checkpoint == "full":  # ... and the one layer recomputed at a time
        act += chunk_size * activation_bytes_per_token_layer(cfg, precision)
    if stage.has_head:
        # ... and one slice of fp32 logits, log-softmax and their gradient (a whole chunk up to loss_chunk).
        act += min(chunk_size, loss_chunk) * cfg.vocab_size * 4 * 3
    act += boundary_tokens * d * ab
    state = 0
    if state_tokens:
        acc = max(ab, 4)  # gradient accumulators are kept in >= fp32
        # keys/values + their gradient accumulators per layer; one layer's prefix gradient in flight
        state = state_tokens * (layers * kv * (ab + acc) + kv * ab)
    optimizer_bytes = trained * max(wb, 4) * opt_states
    if sharding is None or not sharding.fsdp:
        return MemoryEstimate(params=n + adapters, weights=(n + adapters) * wb, grads=trained * wb,
                              optimizer=optimizer_bytes, activations=act, state=state)
    # the chunk whose backward builds the unsharded gradient (every_backward: layer by layer as it frees its own)
    chunk_act = chunk_size * per_token if live_chunks else 0
    units = (n - layers * cfg.layer_params, cfg.layer_params) if layers else (n,)
    return sharded_state(n + adapters, trained, optimizer_bytes, max(units), wb, ab, act, chunk_act, state, sharding)


def sharded_state(params: int, trained: int, optimizer_bytes: int, largest_unit: int, wb: int, ab: int,
                  act: int, chunk_act: int, state: int, sharding: Sharding) -> MemoryEstimate:
    """One rank's peak under FSDP2 (``strategy/sharding.py``): the larger of two moments.

    ``step`` (among the chunks' actions): this rank's shard of the master weights and optimizer state (1 /
    ``dp_shard``), the unsharded compute copy of every parameter (gathered once at step start and held:
    ``reshard_after_forward=false``; with ``true`` only the unit computing and the one prefetched, plus that
    all-gather's buffers), the unsharded gradient accumulated in the reduce dtype (``last_backward``: the whole
    stage's, held from the first backward on; ``every_backward``: built during one chunk's backward while that
    chunk's activations are freed, so only what exceeds them, plus the reduced shards), activations and K/V
    state. ``reduce`` (after the stage's last backward): no activations or state, but the unsharded gradient
    (each unit's freed as its shard appears) and one unit's reduce-scatter buffers. ``ab``: compute
    (= activation) bytes, bf16 under bf16-mixed; ``wb``: master weight, gradient and reduce bytes.
    """
    p = sharding.dp_shard
    weights, optimizer = -(-params // p) * wb, -(-optimizer_bytes // p)
    shards = -(-trained // p) * wb  # reduced gradients, this rank's shard
    unsharded = trained * wb
    if sharding.reshard_after_forward:
        gathered = 2 * largest_unit * ab
        gather_buffers = largest_unit * ab + -(-largest_unit // p) * ab  # all-gather output + input, per chunk
    else:
        gathered, gather_buffers = params * ab, 0
    if sharding.grad_reduce == "last_backward":
        step_grads = unsharded
    else:
        step_grads = max(0, unsharded - chunk_act) + shards
    during = MemoryEstimate(params=params, weights=weights, grads=step_grads, optimizer=optimizer, activations=act,
                            state=state, gathered=gathered, buffers=gather_buffers, phase="step")
    reduce_buffers = largest_unit * wb + -(-largest_unit // p) * wb  # reduce-scatter input + output of one unit
    # unit by unit, a unit's unsharded gradient is freed as its shard appears: never more than the unsharded whole
    at_reduce = MemoryEstimate(params=params, weights=weights, grads=max(unsharded, shards), optimizer=optimizer,
                               activations=0, state=0, gathered=gathered, buffers=reduce_buffers,
                               phase="gradient reduce")
    return max(during, at_reduce, key=lambda e: e.total)


def estimate_training_memory(cfg: ModelConfig, chunk_size: int, k: int, precision: str,
                             optimizer: str = "adamw", loss_chunk: int = 4096,
                             max_seq_len: int | None = None, stage: StageSpec | None = None,
                             live_chunks: int | None = None, layer_checkpoint: str = "none",
                             lora: LoraSettings | None = None, sharding: Sharding | None = None) -> MemoryEstimate:
    """One device's memory: the whole model with ``k`` live chunks, or pipeline ``stage`` holding up to
    ``live_chunks`` chunks' activations at once (its cap in the pipeline plan; default ``k``). The state of
    the longest sequence counts when it is split; stages after the first also keep the ``[T, D]`` inputs of
    its dropped chunks until their recompute."""
    stage = stage if stage is not None else StageSpec.whole(cfg.num_layers)
    state = max_seq_len if max_seq_len is not None and max_seq_len > chunk_size else 0
    return estimate_stage_memory(cfg, stage, chunk_size, live_chunks if live_chunks is not None else k, precision,
                                 optimizer, loss_chunk, state_tokens=state,
                                 boundary_tokens=0 if stage.takes_ids else state, layer_checkpoint=layer_checkpoint,
                                 lora=lora, sharding=sharding)


def stage_params(cfg: ModelConfig, stage: StageSpec) -> int:
    """Parameters a stage builds (``Qwen2Decoder(cfg, stage=stage)``); the whole model's count if whole."""
    d = cfg.hidden_size
    n = len(stage.layer_ids) * cfg.layer_params
    tied = cfg.tie_word_embeddings
    if stage.takes_ids or (stage.has_head and tied):
        n += cfg.vocab_size * d
    if stage.has_head:
        n += d + (0 if tied else cfg.vocab_size * d)
    return n


class InsufficientMemoryError(MemoryError):
    """The memory estimate exceeds what the device has: raised before any allocation."""


def available_memory(device_type: str) -> int:
    """Bytes usable on the device: free host memory for CPU, total memory of GPU 0 for CUDA."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    return available_host_bytes()
