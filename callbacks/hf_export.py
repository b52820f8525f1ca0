"""At the end of fit, write a Hugging Face checkpoint directory that transformers loads."""

from __future__ import annotations

import logging

import lightning as L
import torch

from chunkflow_pl.model.hf_io import save_hf

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class HFExport(L.Callback):
    def __init__(self, hf_dir: str | None = None, dtype: str | None = None, tokenizer_dir: str | None = None) -> None:
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"export.dtype={dtype!r} is unknown; choose one of {sorted(_DTYPES)} or null")
        self.hf_dir = hf_dir
        self.dtype = _DTYPES[dtype] if dtype else None
        self.tokenizer_dir = tokenizer_dir

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.hf_dir:
            return
        export = getattr(trainer.strategy, "export_hf", None)
        if export is not None:  # every rank takes part: each pipeline stage writes its own shard
            out = export(pl_module.model, self.hf_dir, dtype=self.dtype, tokenizer_dir=self.tokenizer_dir)
        elif trainer.is_global_zero:
            out = save_hf(pl_module.model, pl_module.model_cfg, self.hf_dir, dtype=self.dtype,
                          tokenizer_dir=self.tokenizer_dir)
        else:
            return
        if trainer.is_global_zero:
            log.info("exported Hugging Face checkpoint to %s", out)
