"""One fresh process of the determinism test: a chunked float64 step, its gradient hashed.

Usage: python determinism_worker.py HF_DIR CHUNK_SIZE SEED_FOR_HEAP_NOISE
Prints ``<sha256 of all gradients> <first == second step>``. Before the step the process allocates
and frees buffers of random sizes (seeded per process) so its heap, and so the alignment of every
later tensor, differs from the other processes' -- as it does between two runs of one command.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys

import torch

import chunkflow_pl  # noqa: F401  (requests MKL's reproducible mode before any product)
from chunkflow_pl.data.assemble import assemble_step
from chunkflow_pl.data.labels import targets_from_labels
from chunkflow_pl.data.packing import build_chunk_plan
from chunkflow_pl.model.config import ModelConfig
from chunkflow_pl.model.decoder import Qwen2Decoder
from chunkflow_pl.model.hf_io import load_pretrained
from chunkflow_pl.schedule.runner import StepRunner


def main(hf_dir: str, chunk_size: int, noise_seed: int) -> None:
    rng = random.Random(noise_seed)
    keep = [torch.empty(rng.randint(1, 1 << 16), dtype=torch.float64).fill_(rng.random()) for _ in range(64)]
    del keep[:: rng.randint(2, 5)]  # free some: holes of random sizes in the heap

    cfg = ModelConfig.from_hf_dir(hf_dir)
    model = Qwen2Decoder(cfg, loss_chunk=64).double()
    load_pretrained(model, hf_dir, cfg)
    seqs = [torch.tensor(r["input_ids"]) for r in map(json.loads, open(f"{hf_dir}/data.jsonl"))]
    lens = [len(s) for s in seqs]
    targets = [targets_from_labels(s) for s in seqs]
    n_label = sum(int((t != -100).sum()) for t in targets)
    plan = build_chunk_plan(lens, chunk_size)
    batch = assemble_step(plan.chunks, seqs, targets, lens, list(range(len(seqs))), n_label, 0, len(plan.chunks))
    runner = StepRunner(cfg, 1, torch.device("cpu"))  # training's step path, one stage

    digests = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        runner.run(model, batch)
        h = hashlib.sha256()
        for _, p in sorted(model.named_parameters()):
            h.update(p.grad.detach().contiguous().numpy().tobytes())
        digests.append(h.hexdigest())
    print(digests[0], digests[0] == digests[1])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
