"""chunkflow_pl: ChunkFlow (chunked long-context fine-tuning) as a PyTorch Lightning module."""

from chunkflow_pl.utils.reproducibility import request_mkl_cnr

# Before anything imports torch and runs a CPU matrix product (see utils/reproducibility.py).
request_mkl_cnr()

__version__ = "0.1.0"
