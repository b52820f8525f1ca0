"""How the step's sequences were chunked: fill, chains, recompute; a length histogram image every N steps.

Per step, from this rank's ``StepBatch`` (empty data-parallel padding chunks not counted)::

    chunks/count                chunks run
    chunks/fill                 tokens / (chunks x chunk.size): 1.0 = every chunk full
    chunks/segments_per_chunk   mean pieces per chunk (packing)
    chunks/chains               sequences split over several chunks
    chunks/chain_len_mean, chunks/chain_len_max   chunks per split sequence
    chunks/recomputed           chunks whose forward ran twice (``chunk.k``), from ``StepStats``

Every ``histogram_every_n_steps`` steps (0 = never) a PNG with two histograms of the steps since the
last one, tokens per chunk and sequence lengths, is written to
``<run dir>/chunk_histograms/step_<N>.png`` and handed to every logger that has ``log_image``
(``WandbLogger``; CSV and no logger just keep the file). Only rank 0 draws; its chunks are its share.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import lightning as L

from chunkflow_pl.data.types import StepBatch

log = logging.getLogger(__name__)
HISTOGRAM_KEY = "chunks/length_histogram"


def chunk_statistics(batch: StepBatch, chunk_size: int) -> dict[str, float]:
    tokens = [c.num_tokens for c in batch.chunks if c.num_tokens]
    pieces = Counter(seg.seq for c in batch.chunks for seg in c.segments)
    chains = [n for n in pieces.values() if n > 1]
    n = max(len(tokens), 1)
    return {
        "chunks/count": float(len(tokens)),
        "chunks/fill": sum(tokens) / (n * chunk_size),
        "chunks/segments_per_chunk": sum(len(c.segments) for c in batch.chunks) / n,
        "chunks/chains": float(len(chains)),
        "chunks/chain_len_mean": sum(chains) / len(chains) if chains else 0.0,
        "chunks/chain_len_max": float(max(chains, default=0)),
    }


def draw_histogram(path: Path, chunk_tokens: list[int], seq_lens: list[int], chunk_size: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.hist(chunk_tokens, bins=np.linspace(0, chunk_size, 33), color="tab:blue")
    a.axvline(chunk_size, color="k", ls="--", lw=1)
    a.set(xlabel="tokens per chunk", ylabel="chunks", title=f"{len(chunk_tokens)} chunks, chunk.size={chunk_size}")
    top = max(max(seq_lens, default=1), 2)
    b.hist(seq_lens, bins=np.geomspace(1, top, 40), color="tab:orange")
    b.axvline(chunk_size, color="k", ls="--", lw=1)
    b.set(xscale="log", xlabel="sequence length (tokens)", ylabel="sequences", title=f"{len(seq_lens)} sequences")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class ChunkStats(L.Callback):
    def __init__(self, histogram_every_n_steps: int = 50, chunk_size: int | None = None) -> None:
        if histogram_every_n_steps < 0:
            raise ValueError(f"callbacks.chunk_stats.histogram_every_n_steps={histogram_every_n_steps} must be >= 0")
        self.every = int(histogram_every_n_steps)
        self.chunk_size = chunk_size
        self._chunk_tokens: list[int] = []
        self._seq_lens: list[int] = []
        self.images: list[Path] = []  # written so far

    def _size(self, trainer, batch: StepBatch) -> int:
        size = self.chunk_size or getattr(trainer.datamodule, "chunk_size", None)
        return int(size) if size else max((c.num_tokens for c in batch.chunks), default=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        size = self._size(trainer, batch)
        out = chunk_statistics(batch, size)
        stats = getattr(pl_module, "last_stats", None)
        if stats is not None:
            out["chunks/recomputed"] = float(stats.recomputed_chunks)
        pl_module.log_dict(out, batch_size=1)
        if not self.every:
            return
        self._chunk_tokens += [c.num_tokens for c in batch.chunks if c.num_tokens]
        mine = {seg.seq for c in batch.chunks for seg in c.segments}
        self._seq_lens += [batch.seq_lens[s] for s in sorted(mine)]
        step = trainer.global_step
        if step % self.every == 0 and trainer.is_global_zero:
            self._emit(trainer, step, size)

    def _emit(self, trainer, step: int, size: int) -> None:
        path = Path(trainer.default_root_dir) / "chunk_histograms" / f"step_{step:06d}.png"
        draw_histogram(path, self._chunk_tokens, self._seq_lens, size, f"steps up to {step}")
        self._chunk_tokens, self._seq_lens = [], []
        self.images.append(path)
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                log_image(key=HISTOGRAM_KEY, images=[str(path)], step=step)
        log.info("chunk histogram written to %s", path)
