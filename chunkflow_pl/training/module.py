"""The LightningModule: owns the decoder and the optimizer; the strategy runs the chunk plan.

One ``training_step`` = one global batch = one optimizer step. Optimization is manual because a
step is many forward/backward/recompute actions over chunks, ordered by the strategy's scheduler;
Lightning still drives the optimizer step, precision plugin, gradient clipping and checkpoints.

Validation (``validation_step``): each batch runs forward-only through the strategy's step runner; the pass's
sums are reduced over the job once, at its end, and logged as ``val/loss``, ``val/ppl`` and the loss by context
position (``training/validation.py``). Validation touches no weight, gradient, optimizer or random state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from chunkflow_pl.data.config import VAL_POSITION_BUCKETS
from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.attention import resolve_backend
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.model.lora import LoraSettings, apply_lora
from chunkflow_pl.schedule.evaluation import EvalSums
from chunkflow_pl.schedule.executor import StepStats
from chunkflow_pl.training.nonfinite import (
    NonFiniteError,
    assert_finite,
    describe,
    nonfinite_tensors,
    step_is_finite,
    strategy_sum,
)
from chunkflow_pl.training.optim import OptimConfig, build_optimizer, lr_lambda
from chunkflow_pl.training.validation import ValidationResult

log = logging.getLogger(__name__)


def build_decoder(cfg: ModelConfig, stage, backend: str, loss_chunk: int, pretrained: str | None, init_std: float,
                  lora: LoraSettings) -> Qwen2Decoder:
    """The decoder (whole, or the pipeline stage ``stage``) with its weights: loaded from ``pretrained``, or random
    from the global (seeded) generator, then LoRA adapters (after the weights, before the strategy checkpoints and
    shards layers). A stage gets exactly the values of the whole model's parameters it holds."""
    # One draw before anything is built: building modules runs their default init, which moves the global
    # generator by an amount that depends on how many layers this stage builds.
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    model = Qwen2Decoder(cfg, attention_backend=backend, loss_chunk=loss_chunk, stage=stage)
    if pretrained:
        load_pretrained(model, pretrained, cfg)
    else:
        model.reset_parameters(init_std, generator=g)
    apply_lora(model, lora, generator=g)
    return model


class ChunkFlowLM(L.LightningModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        attention: str = "auto",
        loss_chunk: int = 4096,
        pretrained: str | None = None,
        init_std: float = 0.02,
        total_steps: int | None = None,
        lora: LoraSettings | None = None,
        val_position_buckets: Sequence[int] = VAL_POSITION_BUCKETS,
    ) -> None:
        """``total_steps``: the lr schedule's length; None = the Trainer's ``max_steps``. ``lora``: adapters
        injected after the weights are loaded (only they train). ``val_position_buckets``: upper edges of the
        position buckets of ``val/loss_by_position`` (``data.val_position_buckets``)."""
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg = model_cfg
        self.optim_cfg = optim
        self.attention = attention
        self.loss_chunk = loss_chunk
        self.pretrained = pretrained
        self.init_std = init_std
        self.total_steps = total_steps
        self.lora = lora or LoraSettings()
        self.model: Qwen2Decoder | None = None
        self.last_stats: StepStats | None = None
        self.tokens_seen = 0
        self.skipped_steps = 0  # non-finite steps skipped (optim.on_nonfinite=skip)
        self.consecutive_skips = 0
        self.val_position_buckets = tuple(int(e) for e in val_position_buckets)
        self._val_sums: EvalSums | None = None
        self.val_result: ValidationResult | None = None  # the last validation pass (the plot callback reads it)

    def setup(self, stage: str) -> None:
        # Before configure_model allocates: a cosine schedule needs its length.
        if (stage == "fit" and self.total_steps is None and self.optim_cfg.schedule == "cosine"
                and self.trainer.max_steps <= 0):
            raise ValueError("optim.schedule=cosine needs trainer.max_steps > 0 (the decay length); set "
                             "trainer.max_steps or use optim.schedule=constant")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        # Lightning calls this before moving the module: ask the strategy where it will run.
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else self.device
        precision = str(trainer.precision) if trainer is not None else "32-true"
        backend = resolve_backend(self.attention, device, precision)
        # The strategy owns the layout: on a pipeline stage only that stage's layers are built.
        stage = getattr(trainer.strategy, "stage_spec", None) if trainer is not None else None
        self.model = build_decoder(self.model_cfg, stage, backend, self.loss_chunk, self.pretrained, self.init_std,
                                   self.lora)

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optim_cfg)
        total = self.total_steps if self.total_steps is not None else max(self.trainer.max_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim_cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Chunks move to the device one at a time inside the executor: only live chunks occupy memory.
        return batch

    def training_step(self, batch: StepBatch, batch_idx: int) -> None:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        strategy = self.trainer.strategy
        stats = strategy.run_chunk_step(self.model, batch)
        self.last_stats = stats
        # Sum over data parallelism, tie the head, global norm over the pipeline, clip: the strategy's job.
        norm = float(strategy.finish_gradients(self.model, self.optim_cfg.grad_clip))
        loss = stats.global_loss_sum / max(batch.num_label_tokens, 1)
        # Decided before the optimizer step from the global loss and norm, which every rank shares (summed over
        # data parallelism, taken from the last stage, norm over the pipeline): all ranks take the same branch
        # and the weights stay finite.
        if not step_is_finite(loss, norm):
            self._nonfinite_step(opt, batch, loss, norm)
            return
        self.consecutive_skips = 0
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        self.tokens_seen += stats.global_tokens
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/lr", lr, batch_size=1)
        self.log("train/grad_norm", norm, batch_size=1)
        self.log("train/chunks_per_step", float(batch.num_chunks_global or stats.chunks), batch_size=1)
        self.log("train/recomputed_chunks", float(stats.recomputed_chunks), batch_size=1)
        self.log("train/label_tokens", float(batch.num_label_tokens), batch_size=1)
        self.log("train/dp_imbalance", float(stats.dp_imbalance), batch_size=1)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = EvalSums(self.val_position_buckets, self.trainer.strategy.root_device)

    def validation_step(self, batch: StepBatch, batch_idx: int) -> None:
        self.trainer.strategy.run_eval_step(self.model, batch, self._val_sums)

    def on_validation_epoch_end(self) -> None:
        sums, self._val_sums = self._val_sums, None
        values = self.trainer.strategy.eval_totals(sums.values())  # one collective for the whole pass
        self.val_result = ValidationResult.from_sums(sums.buckets.edges, sums.curve.edges, values)
        if self.val_result.tokens == 0:
            log.warning("validation saw no supervised token: nothing logged")
            return
        for key, value in self.val_result.metrics().items():
            self.log(key, value, batch_size=1, prog_bar=key == "val/loss")

    def _nonfinite_step(self, opt, batch: StepBatch, loss: float, norm: float) -> None:
        """optim.on_nonfinite: raise (error) or drop the step's gradients and count it (skip)."""
        what = f"{describe(self.global_step + 1, loss, norm)} (global batch {batch.step_index})"
        opt.zero_grad(set_to_none=True)
        if self.optim_cfg.on_nonfinite == "error":
            raise NonFiniteError(
                f"{what}; stopped before the optimizer step: the weights and every checkpoint written are those of "
                f"step {self.global_step}. Lower optim.lr, check the data, or set optim.on_nonfinite=skip to skip "
                f"such steps")
        self.skipped_steps += 1
        self.consecutive_skips += 1
        bad = nonfinite_tensors(self.model.named_parameters())
        if bad:
            raise NonFiniteError(f"{what} and the weights themselves are non-finite ({', '.join(bad[:4])}): skipping "
                                 f"cannot recover; resume from the last good checkpoint with a lower optim.lr")
        if self.consecutive_skips >= self.optim_cfg.max_consecutive_skips:
            raise NonFiniteError(f"{what}: {self.consecutive_skips} steps in a row were non-finite "
                                 f"(optim.max_consecutive_skips={self.optim_cfg.max_consecutive_skips}); the model is "
                                 f"not recovering: lower optim.lr or check the data")
        log.warning("%s; skipped it (optim.on_nonfinite=skip): %d skipped so far", what, self.skipped_steps)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning writes the checkpoint after this hook: raising here keeps the previous one intact.
        assert_finite(self.model.named_parameters(), f"a checkpoint at step {self.global_step}",
                      strategy_sum(self.trainer.strategy, self.device))
        checkpoint["chunkflow"] = {"tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                                   "model_cfg": self.model_cfg.as_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("chunkflow", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
