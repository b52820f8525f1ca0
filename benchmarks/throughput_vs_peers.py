"""Throughput and memory of chunkflow_pl against plain transformers training, on one long-tail global batch.

All rows train the same objective (summed token cross-entropy of the global batch / its supervised
tokens, one AdamW step per global batch, no clipping, constant lr) from the same random
``Qwen2ForCausalLM`` weights, in the same precision, each in a fresh process::

    (a) hf-per-seq      transformers, one sequence per micro-batch, gradient accumulation (a plain HF loop)
    (b) hf-padded       transformers, micro-batches of length-sorted sequences right-padded to the longest of
                        the micro-batch, at most --hf-tokens padded tokens each (a longer sequence goes alone)
    (c) hf-packed       transformers, padding-free packing: sequences concatenated into rows of at most
                        --hf-tokens tokens, position ids restarting per sequence, first label of each sequence
                        -100 (DataCollatorWithFlattening's format); transformers turns the restarting position
                        ids into a block-diagonal causal mask (masking_utils.find_packed_sequence_indices)
    (d) chunkflow       train.py's path (Hydra config -> ChunkFlowDataModule -> ChunkFlowStrategy -> executor)
                        with --chunk-size and --k (default k = 1)
    (e) chunkflow-pack  the same with chunk.size = the longest sequence: packing only, nothing split
    (f) chunkflow-chain the same as (d) with k = the longest chain: nothing recomputed

Per row: tokens/s over --steps optimizer steps after --warmup warm-up steps (tokens of the global batch /
mean step time), peak memory (process peak RSS on CPU: ``VmHWM``; ``torch.cuda.max_memory_allocated`` on
CUDA) and its growth during training (peak minus the value before the first step), and the relative L2
difference of the first step's gradient to row (a)'s. A row that runs out of memory or time is reported
as such. Then the issue-11 targets, a table and one ``RESULT {json}`` line.

The default batch: the first global batch (--global-batch sequences of the LMSys-like synthetic source,
data.shuffle order, vocabulary --vocab) whose longest sequence is 8x to 12x --chunk-size; or, with
--jsonl FILE, the first --global-batch records of a file of ``{"input_ids": [...], "labels": [...]}``.

    python benchmarks/throughput_vs_peers.py                      # the default (see benchmarks/README.md)
    python benchmarks/throughput_vs_peers.py --rows a,d,f --steps 2
    python benchmarks/throughput_vs_peers.py --jsonl data.jsonl --chunk-size 4k --device cuda --precision bf16-mixed
    python benchmarks/throughput_vs_peers.py --rows a,d --hf-grad-ckpt ...   # the GPU peer row (also: gpu_check p)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from chunkflow_pl.utils.host_memory import current_rss_bytes, peak_rss_bytes  # noqa: E402
from chunkflow_pl.utils.sizes import parse_size  # noqa: E402

MiB = 2**20
ROWS = {
    "a": "hf-per-seq",
    "b": "hf-padded",
    "c": "hf-packed",
    "d": "chunkflow",
    "e": "chunkflow-pack",
    "f": "chunkflow-chain",
}
HF_DTYPES = {"32-true": "float32", "64-true": "float64", "bf16-mixed": "float32", "bf16-true": "bfloat16"}


# ------------------------------------------------------------------------------------------------
# the global batch and the shared initial weights (parent)
# ------------------------------------------------------------------------------------------------


def synthetic_batch(args) -> list[list[int]]:
    """The first global batch (epoch 0 order) whose longest sequence is 8x-12x chunk.size."""
    from chunkflow_pl.data.dataset import epoch_permutation
    from chunkflow_pl.data.sources.synthetic import SyntheticStore

    store = SyntheticStore(args.num_sequences, 12 * args.chunk_size, 2, args.vocab, args.seed)
    perm = epoch_permutation(len(store), 0, True, args.seed)
    g = args.global_batch
    for i in range(len(perm) // g):
        ids = perm[i * g:(i + 1) * g]
        longest = int(store.lengths[ids].max())
        if 8 * args.chunk_size <= longest <= 12 * args.chunk_size:
            return [store.tokens(int(j)).tolist() for j in ids]
    raise SystemExit(f"no global batch of {g} among {args.num_sequences} synthetic sequences has its longest "
                     f"sequence in [8, 12] x chunk.size; raise --num-sequences")


def jsonl_batch(path: Path, n: int) -> list[dict]:
    out = []
    with path.open() as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == n:
                break
    if not out:
        raise SystemExit(f"--jsonl {path}: no records")
    return out


def hf_model(args, vocab: int, max_positions: int = 32768):
    """The random Qwen2 every row starts from (``--layers`` ... ``--vocab``, seeded by ``--seed``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=max_positions)
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(cfg)


def add_batch_and_model_args(p: argparse.ArgumentParser) -> None:
    """The synthetic global batch's and the model's options (shared with ``profile_step.py``)."""
    p.add_argument("--global-batch", type=int, default=16, help="sequences in the global batch (default 16)")
    p.add_argument("--num-sequences", type=int, default=20000, help="synthetic sequences searched for the batch")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1234)


def write_inputs(args, work: Path) -> dict:
    records = (jsonl_batch(Path(args.jsonl), args.global_batch) if args.jsonl
               else [{"input_ids": s} for s in synthetic_batch(args)])
    with (work / "data.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({k: r[k] for k in ("input_ids", "labels") if k in r}) + "\n")
    vocab = max(args.vocab, 1 + max(max(r["input_ids"]) for r in records))
    hf_model(args, vocab, max(32768, 2 * max(len(r["input_ids"]) for r in records))).save_pretrained(work / "hf")
    lens = [len(r["input_ids"]) for r in records]
    return {"sequences": len(lens), "tokens": sum(lens), "longest": max(lens), "vocab": vocab}


# ------------------------------------------------------------------------------------------------
# child: one row
# ------------------------------------------------------------------------------------------------


class Meter:
    """Step times, memory before the first step and at the end, and the first step's gradient."""

    def __init__(self, device) -> None:
        self.device = device
        self.times: list[float] = []
        self.before = 0
        self.grad: dict | None = None

    def start(self) -> None:
        if not self.times and self.before == 0:
            self.before = self._mem()
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def keep_grad(self, named_params, rename=lambda n: n) -> None:
        if self.grad is None:
            self.grad = {rename(n): p.grad.detach().to("cpu", copy=True)
                         for n, p in named_params if p.grad is not None}

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mem(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else current_rss_bytes()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss_bytes()


def _load_records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "data.jsonl").open() if line.strip()]


def hf_micro_batches(row: str, records: list[dict], max_tokens: int):
    """Per row (a/b/c): a list of dicts of int64 lists: input_ids, labels, (attention_mask | position_ids)."""
    seqs = [(r["input_ids"], r.get("labels") or list(r["input_ids"])) for r in records]
    if row == "a":
        return [{"input_ids": [ids], "labels": [lab]} for ids, lab in seqs]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    groups: list[list[int]] = []
    if row == "b":  # sorted lengths, padded to the longest of the group: (count + 1) x longest <= max_tokens
        for i in order:
            if groups and (len(groups[-1]) + 1) * len(seqs[groups[-1][0]][0]) <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        out = []
        for grp in groups:
            width = len(seqs[grp[0]][0])
            pad = [width - len(seqs[i][0]) for i in grp]
            out.append({"input_ids": [seqs[i][0] + [0] * p for i, p in zip(grp, pad)],
                        "labels": [seqs[i][1] + [-100] * p for i, p in zip(grp, pad)],
                        "attention_mask": [[1] * len(seqs[i][0]) + [0] * p for i, p in zip(grp, pad)]})
        return out
    # c: first-fit decreasing into rows of at most max_tokens tokens, no padding
    fill: list[int] = []
    for i in order:
        n = len(seqs[i][0])
        j = next((j for j, f in enumerate(fill) if f + n <= max_tokens), None)
        if j is None:
            groups.append([i])
            fill.append(n)
        else:
            groups[j].append(i)
            fill[j] += n
    out = []
    for grp in groups:
        ids, lab, pos = [], [], []
        for i in grp:
            s_ids, s_lab = seqs[i]
            ids += s_ids
            lab += [-100] + s_lab[1:]  # the previous sequence's last token predicts nothing
            pos += list(range(len(s_ids)))
        out.append({"input_ids": [ids], "labels": [lab], "position_ids": [pos]})
    return out


def run_hf(args, row: str, work: Path, device) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM

    from chunkflow_pl.model.hf_io import from_hf_name
    from chunkflow_pl.training.optim import param_groups

    if row == "c":
        try:
            from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
        except ImportError as e:
            return {"status": f"unsupported: this transformers cannot pack on {device.type} ({e})"}
    dtype = getattr(torch, HF_DTYPES[args.precision])
    model = Qwen2ForCausalLM.from_pretrained(work / "hf", dtype=dtype, attn_implementation="sdpa").to(device).train()
    if args.hf_grad_ckpt:  # keeps each layer's input, recomputes the layer in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    records = _load_records(work)
    n_label = sum(sum(1 for y in (r.get("labels") or r["input_ids"])[1:] if y != -100) for r in records)
    micro = [{k: torch.tensor(v, device=device) for k, v in mb.items()}
             for mb in hf_micro_batches(row, records, args.hf_tokens)]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else torch.autocast(device.type, enabled=False))
    meter = Meter(device)
    n_items = torch.tensor(n_label, device=device)
    for _ in range(args.warmup + args.steps):
        meter.start()
        opt.zero_grad(set_to_none=True)
        for mb in micro:
            with autocast:
                # use_cache=False as in any training loop: a K/V cache costs memory, and transformers skips the
                # packed-sequence mask when one is passed (row c would then attend across sequences)
                loss = model(**mb, use_cache=False, num_items_in_batch=n_items).loss  # sum of token CE / n_label
            loss.backward()
        opt.step()
        meter.stop()
        meter.keep_grad(model.named_parameters(), from_hf_name)  # .grad is still the step's gradient
    return {"micro_batches": len(micro), "padded_tokens": sum(int(mb["input_ids"].numel()) for mb in micro),
            **_finish(meter, args, work, row)}


def run_chunkflow(args, row: str, work: Path, device) -> dict:
    import lightning as L
    from hydra import compose, initialize_config_dir

    from train import train

    info = json.loads((work / "batch.json").read_text())
    chunk = info["longest"] if row == "e" else args.chunk_size
    k = math.ceil(info["longest"] / chunk) if row == "f" else args.k
    meter = Meter(device)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            meter.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            meter.stop()
            meter.keep_grad(pl_module.model.named_parameters())  # .grad is still the step's gradient

    # train.py's defaults, minus what would disturb the measurement: the memory callback resets the CUDA
    # peak every step, the throughput callback's matmul probe allocates before the first step.
    overrides = [f"output_dir={work / ('run_' + row)}", "logger=none", "callbacks.progress=null",
                 "callbacks.checkpoint=null", "callbacks.memory=null", "callbacks.throughput.peak_flops=1e12",
                 "callbacks.chunk_stats.histogram_every_n_steps=0",
                 f"model.pretrained={work / 'hf'}", "data=jsonl", f"data.path={work / 'data.jsonl'}",
                 f"data.cache_dir={work / 'cache'}", f"data.global_batch_size={info['sequences']}",
                 "data.shuffle=false", f"chunk.size={chunk}", f"chunk.k={k}", "optim.lr=1e-4", "optim.grad_clip=0",
                 "optim.schedule=constant", "optim.warmup_steps=0", f"trainer.max_steps={args.warmup + args.steps}",
                 f"trainer.precision={args.precision}", "trainer.enable_model_summary=false", "check_memory=false",
                 f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    out = train(cfg, callbacks=[Timer()])
    stats = out["module"].last_stats
    return {"chunk_size": chunk, "k": k, "chunks": stats.chunks, "recomputed_chunks": stats.recomputed_chunks,
            "peak_state_bytes": stats.peak_state_bytes, **_finish(meter, args, work, row)}


def _finish(meter: Meter, args, work: Path, row: str) -> dict:
    import torch

    torch.save(meter.grad, work / f"grad_{row}.pt")
    timed = meter.times[args.warmup:]
    return {"step_s": sum(timed) / len(timed), "step_times": meter.times, "warmup": args.warmup,
            "mem_before": meter.before, "mem_peak": meter.peak()}


def child(args) -> None:
    import torch

    row, work = args.row, Path(args.workdir)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        res = run_hf(args, row, work, device) if row in "abc" else run_chunkflow(args, row, work, device)
        res.setdefault("status", "ok")
    except torch.cuda.OutOfMemoryError as e:
        res = {"status": f"OOM: {str(e).splitlines()[0][:160]}"}
    except MemoryError as e:
        res = {"status": f"OOM: host ({e})"}
    res["device"] = device.type
    print("ROW " + json.dumps(res))


# ------------------------------------------------------------------------------------------------
# parent: rows, gradients, table, targets
# ------------------------------------------------------------------------------------------------


def run_row(row: str, args, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row, "--workdir", str(work)] + args.child_argv
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return {"status": f"timeout > {args.timeout:g} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("ROW "):
            return {**json.loads(line[4:]), "wall_s": wall}
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
    if p.returncode in (-9, 137) or "out of memory" in (p.stderr or "").lower():
        return {"status": f"OOM (killed, rc={p.returncode})", "wall_s": wall}
    return {"status": f"failed rc={p.returncode}: {tail[0][:200]}", "wall_s": wall}


def grad_rel_diff(a: dict, b: dict) -> float:
    import torch

    num = den = 0.0
    for name, ga in a.items():
        gb = b.get(name)
        gb = torch.zeros_like(ga) if gb is None else gb
        num += float((gb.double() - ga.double()).pow(2).sum())
        den += float(ga.double().pow(2).sum())
    return math.sqrt(num) / math.sqrt(den)


def targets(res: dict) -> list[tuple[str, bool, str]]:
    """Issue 11's targets on this run: (what, met, by how much)."""
    a, d, f = res.get("a"), res.get("d"), res.get("f")
    out = []
    ok = all(r is not None and r["status"] == "ok" for r in (a, d, f))
    if not ok:
        return [("rows a, d, f all ran", False, "see the table")]
    speed, mem = d["tokens_per_s"] / a["tokens_per_s"], d["mem_peak"] / a["mem_peak"]
    out.append(("k=1 tokens/s >= 0.85x row (a)", speed >= 0.85, f"{speed:.2f}x"))
    out.append(("k=1 peak memory <= 0.5x row (a)", mem <= 0.5, f"{mem:.2f}x"))
    # the same on what training adds to the process (peak minus the value before the first step): the
    # processes start from different baselines (Lightning, Hydra and W&B imports in the chunkflow rows)
    grow = (d["mem_peak"] - d["mem_before"]) / (a["mem_peak"] - a["mem_before"])
    out.append(("k=1 memory growth <= 0.5x row (a)", grow <= 0.5, f"{grow:.2f}x"))
    recompute = d["step_s"] / f["step_s"]
    out.append(("k=1 step time <= 1.3x k=chain", recompute <= 1.3, f"{recompute:.2f}x"))
    chain = f["tokens_per_s"] / a["tokens_per_s"]
    out.append(("k=chain tokens/s >= row (a)", chain >= 1.0, f"{chain:.2f}x"))
    return out


def table(res: dict) -> str:
    mem = "peak MiB (CUDA alloc)" if any(r.get("device") == "cuda" for r in res.values()) else "peak RSS MiB"
    head = (f"{'row':<18} {'setting':<22} {'tokens/s':>9} {'vs (a)':>7} {'step s':>7} {'best s':>7} {mem:>21} "
            f"{'vs (a)':>7} {'growth MiB':>10} {'grad rel diff':>13}")
    lines = [head, "-" * len(head)]
    a = res.get("a", {})
    for row, r in res.items():
        name = f"({row}) {ROWS[row]}"
        if row in "abc":
            setting = f"{r.get('micro_batches', '-')} micro-batches"
        else:
            setting = f"C={r.get('chunk_size', '-')} k={r.get('k', '-')} recomp={r.get('recomputed_chunks', '-')}"
        if r["status"] != "ok":
            lines.append(f"{name:<18} {setting:<22} {r['status']}")
            continue
        speed = f"{r['tokens_per_s'] / a['tokens_per_s']:.2f}x" if a.get("status") == "ok" else "-"
        mem = f"{r['mem_peak'] / a['mem_peak']:.2f}x" if a.get("status") == "ok" else "-"
        diff = f"{r['grad_rel_diff']:.2e}" if r.get("grad_rel_diff") is not None else "-"
        growth = (r["mem_peak"] - r["mem_before"]) / MiB
        best = min(r["step_times"][r["warmup"]:])  # the fastest timed step: how much of the mean is noise
        lines.append(f"{name:<18} {setting:<22} {r['tokens_per_s']:>9.0f} {speed:>7} {r['step_s']:>7.2f} {best:>7.2f} "
                     f"{r['mem_peak'] / MiB:>21.0f} {mem:>7} {growth:>10.0f} {diff:>13}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="a,b,c,d,e,f", help="rows to run, comma separated (a..f)")
    p.add_argument("--chunk-size", default="512", help="chunk.size of rows d and f (default 512)")
    p.add_argument("--k", type=int, default=1, help="chunk.k of row d (default 1)")
    add_batch_and_model_args(p)
    p.add_argument("--jsonl", default=None, help="take the batch from this file of token ids instead")
    p.add_argument("--hf-tokens", default=None, help="rows b, c: padded/packed tokens per micro-batch "
                                                     "(default: the longest sequence)")
    p.add_argument("--hf-grad-ckpt", action="store_true", help="rows a-c: transformers' gradient checkpointing "
                   "(what a long-context HF run turns on; the GPU peer row)")
    p.add_argument("--precision", default="32-true", choices=sorted(HF_DTYPES))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first one's gradient is compared)")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per row (default 2)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per row before it is reported as timed out")
    p.add_argument("--workdir", default=None, help="keep inputs, gradients and runs here (default: a temp dir)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    args.chunk_size = parse_size(args.chunk_size, key="--chunk-size")
    if args.hf_tokens is not None:
        args.hf_tokens = parse_size(args.hf_tokens, key="--hf-tokens")
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.row is not None:
        child(args)
        return {}
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if "a" not in rows:
        rows.insert(0, "a")  # the reference for the gradient and the ratios
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        info = write_inputs(args, work)
        (work / "batch.json").write_text(json.dumps(info))
        hf_tokens = args.hf_tokens or info["longest"]
        args.child_argv = ["--chunk-size", str(args.chunk_size), "--k", str(args.k), "--precision", args.precision,
                           "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
                           "--hf-tokens", str(hf_tokens), "--seed", str(args.seed)] + \
            (["--hf-grad-ckpt"] if args.hf_grad_ckpt else [])
        print(f"global batch: {info['sequences']} sequences, {info['tokens']} tokens, longest {info['longest']} "
              f"({info['longest'] / args.chunk_size:.1f}x chunk.size={args.chunk_size}); model {args.layers} layers, "
              f"hidden {args.hidden}, vocab {info['vocab']}, {args.precision}", flush=True)
        res: dict[str, dict] = {}
        for row in sorted(rows):
            r = run_row(row, args, work)
            if r["status"] == "ok":
                import torch

                r["tokens_per_s"] = info["tokens"] / r["step_s"]
                grads = torch.load(work / f"grad_{row}.pt")
                ref = grads if row == "a" else torch.load(work / "grad_a.pt") if res["a"]["status"] == "ok" else None
                r["grad_rel_diff"] = grad_rel_diff(ref, grads) if ref is not None and row != "a" else None
            res[row] = r
            print(f"  ({row}) {ROWS[row]}: {r['status']}, {r['wall_s']:.0f} s", flush=True)
    print()
    print(table(res))
    checks = targets(res)
    print()
    for what, met, how in checks:
        print(f"  target {what}: {'met' if met else 'MISSED'} ({how})")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    out = {"benchmark": "throughput_vs_peers", "batch": info, "chunk_size": args.chunk_size, "k": args.k,
           "precision": args.precision, "hf_tokens": hf_tokens,
           "model": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads")},
           "rows": res, "targets": [{"what": w, "met": m, "value": h} for w, m, h in checks], "total_s": total}
    line = json.dumps(out)
    print("RESULT " + line)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    return out


if __name__ == "__main__":
    main()
