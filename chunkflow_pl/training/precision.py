"""Which training precisions and export dtypes a run can use, checked before anything is built.

A chunked step runs many backward passes per optimizer step and scales no loss, so the float16 modes
fail late or silently: ``16-true`` overflows (NaN loss at step 2 of the default run), ``16-mixed`` needs
loss scaling (on CPU Lightning even swaps it for ``bf16-mixed`` while the memory estimate says
``16-mixed``). ``train.py`` calls :func:`check_precisions` first, before tokenising or allocating, so
these are one-line errors naming the key.
"""

from __future__ import annotations

import torch

# Lightning's names the chunked step runs, and the legacy short forms Lightning maps onto them.
SUPPORTED = ("64-true", "32-true", "bf16-mixed", "bf16-true")
_ALIASES = {"64": "64-true", "32": "32-true", "bf16": "bf16-mixed"}
_WHY = {
    "16-true": "float16 weights and activations overflow without loss scaling (NaN loss within a few steps)",
    "16-mixed": "float16 autocast needs loss scaling, which chunked backward does not apply (on CPU Lightning would "
                "also run bf16-mixed instead)",
    "16": "float16 autocast needs loss scaling, which chunked backward does not apply",
}
# export.dtype: the tensor dtype of the Hugging Face export (null = the training dtype).
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}


def check_precision(precision: str | int) -> str:
    """``precision`` (``trainer.precision``) as one of :data:`SUPPORTED`, or ValueError naming the key."""
    name = _ALIASES.get(str(precision), str(precision))
    if name in SUPPORTED:
        return name
    why = _WHY.get(name, "it is not a precision this project runs")
    raise ValueError(f"trainer.precision={precision} is not supported: {why}; use one of {', '.join(SUPPORTED)}")


def export_dtype(name: str | None) -> torch.dtype | None:
    """``export.dtype`` as a torch dtype (None: keep the training dtype), or ValueError naming the key."""
    if name is None:
        return None
    if name not in EXPORT_DTYPES:
        raise ValueError(f"export.dtype={name!r} is unknown; choose one of {', '.join(sorted(EXPORT_DTYPES))} or null")
    return EXPORT_DTYPES[name]


def check_precisions(precision: str | int, export: str | None = None) -> None:
    """Both checks at once: what ``train.py`` calls before anything is built."""
    check_precision(precision)
    export_dtype(export)
