"""At the end of fit, write a Hugging Face checkpoint directory that transformers loads."""

from __future__ import annotations

import logging

import lightning as L

from chunkflow_pl.model.hf_io import save_hf
from chunkflow_pl.training.nonfinite import assert_finite, strategy_sum
from chunkflow_pl.training.precision import export_dtype

log = logging.getLogger(__name__)


class HFExport(L.Callback):
    def __init__(self, hf_dir: str | None = None, dtype: str | None = None, tokenizer_dir: str | None = None,
                 merge_lora: bool = False) -> None:
        """``merge_lora``: with LoRA adapters, write the merged full weights instead of a PEFT adapter folder."""
        self.hf_dir = hf_dir
        self.dtype = export_dtype(dtype)  # train.py checked it at start already (training/precision.py)
        self.tokenizer_dir = tokenizer_dir
        self.merge_lora = merge_lora

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.hf_dir:
            return
        assert_finite(pl_module.model.named_parameters(), f"the Hugging Face export export.hf_dir={self.hf_dir}",
                      strategy_sum(trainer.strategy, pl_module.device))
        export = getattr(trainer.strategy, "export_hf", None)
        if export is not None:  # every rank takes part: each pipeline stage writes its own shard
            out = export(pl_module.model, self.hf_dir, dtype=self.dtype, tokenizer_dir=self.tokenizer_dir,
                         merge_lora=self.merge_lora, base_model=getattr(pl_module, "pretrained", None))
        elif trainer.is_global_zero:
            out = save_hf(pl_module.model, pl_module.model_cfg, self.hf_dir, dtype=self.dtype,
                          tokenizer_dir=self.tokenizer_dir)
        else:
            return
        if trainer.is_global_zero:
            log.info("exported Hugging Face checkpoint to %s", out)
