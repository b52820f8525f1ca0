"""Back-of-envelope training memory, computed from the config before any weight is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.stages import StageSpec

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
class MemoryEstimate:
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    state: int = 0  # K/V state of the longest sequence: pieces + gradient accumulators + one prefix copy

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.state

    def table(self) -> str:
        rows = [("parameters", f"{self.params / 1e9:.3f} B"), ("weights", _g(self.weights)),
                ("gradients", _g(self.grads)), ("optimizer state", _g(self.optimizer)),
                ("activations (chunk x k)", _g(self.activations)), ("K/V state (longest seq)", _g(self.state)),
                ("total", _g(self.total))]
        return "\n".join(f"  {k:<26}{v:>12}" for k, v in rows)


def _g(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def stage_num_params(cfg: ModelConfig, stage: StageSpec) -> int:
    """Parameters a pipeline stage holds (a tied head on the last stage counts: it is a second copy)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    head = v * d  # lm_head, or the tied embed.weight the last stage holds for it
    per_layer = (cfg.num_params() - v * d - d - (0 if cfg.tie_word_embeddings else head)) // cfg.num_layers
    return (len(stage.layer_ids) * per_layer + (v * d if stage.takes_ids else 0)
            + (d if stage.has_head else 0)
            + (head if stage.has_head and not (stage.takes_ids and cfg.tie_word_embeddings) else 0))


def estimate_training_memory(cfg: ModelConfig, chunk_size: int, k: int, precision: str,
                             optimizer: str = "adamw", loss_chunk: int = 4096,
                             max_seq_len: int | None = None, stage: StageSpec | None = None,
                             live_chunks: int | None = None) -> MemoryEstimate:
    """One device's memory: the whole model, or pipeline ``stage`` holding up to ``live_chunks`` chunks'
    activations at once (its cap in the pipeline plan; default ``k``)."""
    wb, ab = precision_bytes(precision)
    stage = stage if stage is not None else StageSpec.whole(cfg.num_layers)
    layers = len(stage.layer_ids)
    n = stage_num_params(cfg, stage)
    opt_states = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = 2 * cfg.num_kv_heads * cfg.head_dim
    # Saved tensors per token and layer: norms, q/k/v, attention out, MLP in/gate/up/act (rough, no fusion).
    per_token_layer = (4 * d + d + kv + 3 * f) * ab
    act = (live_chunks if live_chunks is not None else k) * chunk_size * layers * per_token_layer
    if stage.has_head:
        act += min(chunk_size, loss_chunk) * cfg.vocab_size * 4 * 2  # one slice of fp32 logits + grad
    state = 0
    if max_seq_len is not None and max_seq_len > chunk_size:
        # k/v pieces + their fp32 gradient accumulators + the prefix copy a live chunk holds
        state = max_seq_len * layers * kv * (ab + 4 + ab)
        if not stage.takes_ids:  # inputs [T, D] of the dropped chunks, kept until their recompute
            state += max_seq_len * d * ab
    return MemoryEstimate(params=n, weights=n * wb, grads=n * wb, optimizer=n * max(wb, 4) * opt_states,
                          activations=act, state=state)


class InsufficientMemoryError(MemoryError):
    """The memory estimate exceeds what the device has: raised before any allocation."""


def available_memory(device_type: str) -> int:
    """Bytes usable on the device: free host memory for CPU, total memory of GPU 0 for CUDA."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[1])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
