"""Constants shared by the data and model layers (which must not import each other)."""

IGNORE_INDEX = -100  # a target that is not supervised (Hugging Face / PyTorch cross-entropy convention)
