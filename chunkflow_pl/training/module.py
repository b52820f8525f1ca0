"""The LightningModule: owns the decoder and the optimizer; the strategy runs the chunk plan.

One ``training_step`` = one global batch = one optimizer step. Optimization is manual because a
step is many forward/backward/recompute actions over chunks, ordered by the strategy's planner;
Lightning still drives the optimizer step, precision plugin, gradient clipping and checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from chunkflow_pl.data.types import StepBatch
from chunkflow_pl.model.attention import resolve_backend
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.schedule.executor import StepStats
from chunkflow_pl.training.optim import OptimConfig, build_optimizer, lr_lambda


class ChunkFlowLM(L.LightningModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        optim: OptimConfig,
        attention: str = "auto",
        loss_chunk: int = 4096,
        pretrained: str | None = None,
        init_std: float = 0.02,
        total_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg = model_cfg
        self.optim_cfg = optim
        self.attention = attention
        self.loss_chunk = loss_chunk
        self.pretrained = pretrained
        self.init_std = init_std
        self.total_steps = total_steps
        self.model: Qwen2Decoder | None = None
        self.last_stats: StepStats | None = None
        self.tokens_seen = 0

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
        self.model = Qwen2Decoder(self.model_cfg, attention_backend=backend, loss_chunk=self.loss_chunk, stage=stage)
        if self.pretrained:
            load_pretrained(self.model, self.pretrained, self.model_cfg)
        else:
            self.model.reset_parameters(self.init_std)

    def configure_optimizers(self):
        opt = build_optimizer(self.model, self.optim_cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim_cfg, self.total_steps))
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
        # Sum over data parallelism, tie the head, global norm over the pipeline, clip: the strategy's job.
        grad_norm = strategy.finish_gradients(self.model, self.optim_cfg.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        self.last_stats = stats
        self.tokens_seen += stats.global_tokens
        loss = stats.global_loss_sum / max(batch.num_label_tokens, 1)
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        self.log("train/lr", lr, batch_size=1)
        self.log("train/grad_norm", float(grad_norm), batch_size=1)
        self.log("train/chunks_per_step", float(batch.num_chunks_global or stats.chunks), batch_size=1)
        self.log("train/recomputed_chunks", float(stats.recomputed_chunks), batch_size=1)
        self.log("train/label_tokens", float(batch.num_label_tokens), batch_size=1)
        self.log("train/dp_imbalance", float(stats.dp_imbalance), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["chunkflow"] = {"tokens_seen": self.tokens_seen, "model_cfg": self.model_cfg.as_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("chunkflow", {}).get("tokens_seen", 0))
