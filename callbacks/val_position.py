"""``val/loss_by_position`` as a picture: validation loss against the position of the predicted token.

After every validation pass (sanity checks excepted), rank 0 draws the pass's ``ValidationResult``
(``chunkflow_pl/training/validation.py``): the loss in power-of-two position bins (a curve: does the loss keep
falling as the context grows, i.e. is long context used?) and the loss of each ``data.val_position_buckets``
bucket with its token count (the numbers logged as ``val/loss_by_position/<bucket>``). The PNG goes to
``<run dir>/val_loss_by_position/step_<N>.png`` and, as ``val/loss_by_position``, to every logger that has
``log_image`` (``WandbLogger`` wraps it in ``wandb.Image``; CSV and no logger just keep the file).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L

from chunkflow_pl.training.validation import ValidationResult, bucket_labels

log = logging.getLogger(__name__)
PLOT_KEY = "val/loss_by_position"


def draw_loss_by_position(path: Path, r: ValidationResult, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    lows = (1, *r.curve_edges)  # positions start at 1 (a prediction has at least one token of context)
    pts = [(math.sqrt(lo * hi), loss) for lo, hi, loss in zip(lows, (*r.curve_edges, 2 * lows[-1]), r.curve_loss)
           if loss is not None]
    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color="tab:blue", ms=4, label="power-of-two bins")
    top = max((hi for hi, loss in zip((*r.curve_edges, 2 * lows[-1]), r.curve_loss) if loss is not None), default=2)
    b_lows = (1, *r.bucket_edges)
    b_highs = (*r.bucket_edges, max(top, 2 * r.bucket_edges[-1]))
    for lo, hi, loss, n, label in zip(b_lows, b_highs, r.bucket_loss, r.bucket_tokens, bucket_labels(r.bucket_edges)):
        if loss is None:
            continue
        hi = min(hi, top)
        ax.hlines(loss, lo, hi, colors="tab:orange", lw=3, alpha=0.7)
        ax.annotate(f"{label}: {loss:.3f}\n{n:,} tokens", (math.sqrt(lo * hi), loss), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=7, color="tab:orange")
    ax.plot([], [], color="tab:orange", lw=3, alpha=0.7, label="data.val_position_buckets")
    ax.set(xscale="log", xlabel="position of the predicted token (tokens of context)", ylabel="cross-entropy",
           title=title)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


class LossByPositionPlot(L.Callback):
    def __init__(self) -> None:
        self.images: list[Path] = []  # written so far

    def on_validation_end(self, trainer, pl_module) -> None:
        result = getattr(pl_module, "val_result", None)
        if trainer.sanity_checking or not trainer.is_global_zero or result is None or result.tokens == 0:
            return
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / "val_loss_by_position" / f"step_{step:06d}.png"
        draw_loss_by_position(path, result, f"validation at step {step}: val/loss {result.loss:.3f}, "
                                            f"{result.tokens:,} tokens")
        self.images.append(path)
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                log_image(key=PLOT_KEY, images=[str(path)], step=step)
        log.info("validation loss by position written to %s", path)
