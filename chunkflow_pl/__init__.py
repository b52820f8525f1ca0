"""chunkflow_pl: ChunkFlow (chunked long-context fine-tuning) as a PyTorch Lightning module."""

__version__ = "0.1.0"
