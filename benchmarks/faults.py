"""Fault campaign (issue 19 item 2): signals at random moments of 2-rank ``train.py`` runs, then resume.

    python benchmarks/faults.py                       # 21 trials, a few minutes; the seed is printed
    python benchmarks/faults.py --trials 105 --seed 7 # the README's run

Each trial starts a ``parallel.dp=2``, ``parallel.pp=2`` or ``parallel.dp_shard=2`` run (a tiny float64 model,
gloo on the CPU, a checkpoint every step; ``fault_launch.py`` starts the ranks) and sends one of SIGTERM,
SIGUSR1, SIGKILL to one random rank or to every rank, or SIGSTOP to one rank (a hung peer), at a random moment:
during start-up (a random delay after launch, reading the data, creating the process group), a random delay
into step S, the K-th chunk-action boundary, or a point inside the periodic DCP save (``fault_inject.py``).
Then it checks, against the README:

    exit codes      SIGTERM/SIGUSR1: every rank 143/138 (a clean pre-emption); SIGKILL: non-zero on every
                    rank; SIGSTOP: the other rank non-zero, its error naming the stopped rank
    hangs           every rank (but a stopped one) ended within DEADLINE_S of the fault
                    (SIGSTOP: 2 x parallel.collective_timeout + DEADLINE_S)
    lost checkpoint what a restarted job resumes from (the run folder's newest pre-emption checkpoint, else
                    checkpoints/last.ckpt) is complete and loadable, holds every step a completed save held,
                    and after a clean stop is the pre-emption checkpoint
    resume mismatch the restarted job (same command, TORCHELASTIC_RESTART_COUNT=1) exits 0 on every rank
                    and exports weights byte-identical to the uninterrupted run's (one reference per layout)

It prints one row per failed check as it goes, a table per layout x case, and one JSON line (``RESULT {...}``).
Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

from fault_launch import Run, in_child, launch

LAYOUTS = {"dp": "parallel.dp=2", "pp": "parallel.pp=2", "dp_shard": "parallel.dp_shard=2"}
CASES = [("SIGTERM", "one"), ("SIGTERM", "all"), ("SIGUSR1", "one"), ("SIGUSR1", "all"), ("SIGKILL", "one"),
         ("SIGKILL", "all"), ("SIGSTOP", "one")]
SAVE_PARTS = ["begin", "shards", "meta", "commit", "swap", "end"]
STARTUP = ["delay", "tokenise", "pg_before", "pg_after"]
STOP_SLACK_S = 30.0  # SIGSTOP: the other rank's error may come this long after the collective timeout
DEADLINE_S = 90.0  # a step and a save of the tiny model take well under a second; a loaded box is slower
WORLD = 2
# Two global batches of 7 (packed short sequences and chains of dependent chunks at chunk.size 32).
LENS = [7, 64, 100, 33, 2, 70, 32, 5, 90, 40, 3, 12, 66, 20]
TINY = ["model.overrides.num_layers=2", "model.overrides.hidden_size=32", "model.overrides.num_heads=2",
        "model.overrides.num_kv_heads=1", "model.overrides.intermediate_size=64", "model.overrides.vocab_size=97"]


def write_data(path: Path) -> None:
    rng = random.Random(2)
    with open(path, "w") as f:
        for i, n in enumerate(LENS):
            ids = [rng.randrange(97) for _ in range(n)]
            labels = [-100 if i == 2 and j < 30 else t for j, t in enumerate(ids)]  # a prompt inside a chain
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")


def argv(layout: str, run: Path, data: Path, steps: int, timeout_s: int) -> list[str]:
    return ["data=jsonl", f"data.path={data}", f"data.cache_dir={run / 'cache'}", "data.global_batch_size=7",
            "data.shuffle=false", "chunk.size=32", "chunk.k=1", *TINY, "trainer.precision=64-true", "optim=adamw",
            "optim.lr=1e-2", "optim.schedule=constant", "optim.warmup_steps=0", f"trainer.max_steps={steps}",
            "logger=none", "callbacks.progress=null", "callbacks.throughput=null", "callbacks.memory=null",
            "callbacks.chunk_stats=null", "callbacks.val_position_plot=null", "trainer.enable_model_summary=false",
            "trainer.accelerator=cpu", "callbacks.checkpoint.every_n_train_steps=1",
            f"export.hf_dir={run / 'export'}", f"parallel.collective_timeout={timeout_s}s", f"hydra.run.dir={run}",
            LAYOUTS[layout], "+callbacks.fault._target_=fault_inject.FaultInjector",
            f"+callbacks.fault.plan={run / 'plan.json'}"]


def start(folder: Path, layout: str, data: Path, steps: int, timeout_s: int, plan: dict, restart: bool = False) -> Run:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    for f in ("fired", "pids.json", *(f"events.r{r}" for r in range(WORLD))):
        (folder / f).unlink(missing_ok=True)
    env = {"TORCHELASTIC_RESTART_COUNT": "1", "HYDRA_FULL_ERROR": "1"} if restart else {"HYDRA_FULL_ERROR": "1"}
    run = launch(folder, WORLD, argv(layout, folder, data, steps, timeout_s), env, "resume" if restart else "rank")
    (folder / "pids.tmp").write_text(json.dumps({str(r): p for r, p in run.pids.items()}))
    (folder / "pids.tmp").rename(folder / "pids.json")  # whole when a rank reads it
    return run


def events(folder: Path, rank: int) -> list[tuple[float, str, int]]:
    try:
        lines = (folder / f"events.r{rank}").read_text().splitlines()
    except OSError:
        return []
    return [(float(t), what, int(s)) for t, what, s in (ln.split() for ln in lines if len(ln.split()) == 3)]


def exported(folder: Path) -> dict[str, bytes]:
    """The exported weights' files (one, or one per pipeline stage) by name."""
    return {f.name: f.read_bytes() for f in sorted((folder / "export").glob("*.safetensors"))}


def reference(out: Path, layout: str, data: Path, steps: int, timeout_s: int) -> dict:
    """The uninterrupted run: its exported weights, start-up time, step time, chunk boundaries."""
    folder = out / f"reference_{layout}"
    shutil.rmtree(folder, ignore_errors=True)
    run = start(folder, layout, data, steps, timeout_s, {"point": ""})
    left = run.wait(time.monotonic() + 600)
    if left or any(run.codes.values()):
        run.kill()
        raise SystemExit(f"the reference {layout} run failed ({run.codes}):\n{run.log(0)[-3000:]}")
    ev = events(folder, 0)
    starts = [t for t, w, _ in ev if w == "step_start"]
    ends = [t for t, w, _ in ev if w == "step_end"]
    return {"weights": exported(folder), "startup_s": starts[0] - run.started,
            "step_s": statistics.median(e - s for s, e in zip(starts, ends)),
            "wall_s": max(run.ended.values()) - run.started}


PHASES = ["startup", "step:inside", "step:boundary", "save"]


def sample(rng: random.Random, layout: str, ref: dict, steps: int, phases: list[str] = PHASES) -> dict:
    """One trial's fault. SIGSTOP is not aimed at start-up: a rank stopped before it registered with the
    rendezvous cannot be named (the others only time out), and is weighted lower (each costs the timeout)."""
    while True:
        sig, who = rng.choices(CASES, weights=[1, 1, 1, 1, 1, 1, 0.6])[0]
        allowed = [p for p in phases if not (sig == "SIGSTOP" and p == "startup")]
        if allowed:
            break
    phase = rng.choice(allowed)
    s = rng.randint(1, steps - 1)  # a step after it, so a signal inside this one has a step start to stop at
    plan = {"layout": layout, "signal": int(getattr(signal, sig)), "name": sig, "who": who, "step": s,
            "targets": list(range(WORLD)) if who == "all" else [rng.randrange(WORLD)]}
    if phase == "startup":
        part = rng.choice(STARTUP)
        plan["point"] = f"startup:{part}"
        plan["delay"] = round(rng.uniform(0.0, ref["startup_s"]), 3)
    elif phase == "step:inside":
        plan.update(point=phase, delay=round(rng.uniform(0.0, ref["step_s"]), 4))
    elif phase == "step:boundary":
        plan.update(point=phase, boundary=rng.randrange(6))
    else:
        plan["point"] = f"save:{rng.choice(SAVE_PARTS)}@{s}"
    return plan


def checkpoint_state(folder: str) -> dict:
    """In a child: what a restarted job in ``folder`` would resume from, checked as loading checks it."""
    import torch

    from chunkflow_pl.strategy import checkpoint as ckpt
    from chunkflow_pl.utils.run_dir import resume_policy

    src = resume_policy(folder, None, {"TORCHELASTIC_RESTART_COUNT": "1"})
    if src is None:
        return {"path": None, "step": None}
    if src == "hpc":
        src = max(Path(folder).glob("hpc_ckpt_*.ckpt"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    path = ckpt.readable_checkpoint(src)
    ckpt._check_shards(path, ckpt._check_metadata(path))
    meta = torch.load(path / ckpt.META, map_location="cpu", weights_only=True)
    return {"path": str(path), "step": int(meta["global_step"])}


def names_rank(log: str, rank: int, own: int) -> bool:
    """The rank's error line names ``rank`` (its own ``rank <own>:`` prefix does not count)."""
    lines = [ln for ln in log.splitlines() if "[ERROR]" in ln or ln.startswith("error:")]
    return any(re.search(rf"rank\(s\) \[[0-9, ]*\b{rank}\b|rank {rank}\b", ln.replace(f"rank {own}:", ""))
               for ln in lines)


def trial(folder: Path, plan: dict, ref: dict, data: Path, steps: int, timeout_s: int) -> dict:
    layout, sig = plan["layout"], plan["signal"]
    run = start(folder, layout, data, steps, timeout_s, plan)
    fired_at: list[float] = []

    def watch(r: Run) -> None:  # start-up delays are the driver's: a moment the ranks know nothing about
        if plan["point"] == "startup:delay" and not fired_at and time.monotonic() >= r.started + plan["delay"]:
            fired_at.append(time.monotonic())
            (folder / "fired").touch()
            for t in plan["targets"]:
                try:
                    os.kill(r.pids[t], sig)
                except ProcessLookupError:
                    pass

    deadline = DEADLINE_S + (2 * timeout_s if sig == signal.SIGSTOP else 0)
    stopped = plan["targets"] if sig == signal.SIGSTOP else []
    give_up = time.monotonic() + 600  # the point never reached and the run never ending is a hang too
    while True:
        run.poll()
        watch(run)
        fire = fired_at + [t for r in run.pids for t, w, _ in events(folder, r) if w.startswith("fire:")]
        alive = [r for r in run.pids if r not in run.codes and r not in stopped]
        now = time.monotonic()
        if not alive or now > (min(fire) + deadline if fire else give_up):
            break
        time.sleep(0.02)
    hang = alive
    run.kill()  # what is left: a stopped rank (as torchrun ends a job's other workers), or a hung one
    res = {"plan": plan, "codes": run.codes, "fired": bool(fire), "hang": hang, "problems": []}
    if not fire:  # the point was never reached (the run ended first): not a trial of anything, unless it failed
        if any(run.codes.get(r) != 0 for r in run.pids):
            res["problems"].append(f"the run ended before the fault with exit codes {run.codes}")
        return res
    logs = {r: run.log(r) for r in run.pids}
    if sig in (signal.SIGTERM, signal.SIGUSR1):
        res["clean"] = all(run.codes.get(r) == 128 + sig for r in run.pids)
        if not res["clean"]:
            res["problems"].append(f"exit codes {run.codes}, expected {128 + sig} on every rank")
    elif sig == signal.SIGKILL:
        if any(run.codes.get(r, 0) == 0 for r in run.pids):
            res["problems"].append(f"exit codes {run.codes}, expected non-zero on every rank")
    else:
        for r in run.pids:
            if r not in stopped and (run.codes.get(r, 0) == 0 or not names_rank(logs[r], stopped[0], r)):
                res["problems"].append(f"rank {r} exit {run.codes.get(r)}; its error does not name the stopped "
                                       f"rank {stopped[0]}")
    if hang:
        res["problems"].append(f"rank(s) {hang} still running {deadline:.0f} s after the fault")
    res["bad_exit"] = bool(res["problems"]) and not hang
    others = [run.ended[r] for r in run.pids if r not in stopped and r in run.ended]
    if stopped and others:  # the README's promise: named within the timeout (+ a step's compute, on a loaded box)
        res["stop_named_s"] = round(max(others) - min(fire), 1)
        if res["stop_named_s"] > timeout_s + STOP_SLACK_S:  # counted as a hang
            res["hang"] = [r for r in run.pids if r not in stopped]
            res["problems"].append(f"the other rank stopped {res['stop_named_s']} s after the stop, more than "
                                   f"parallel.collective_timeout={timeout_s}s + {STOP_SLACK_S:.0f} s")

    saved = [s for _, w, s in events(folder, 0) if w == "saved"]  # saves that completed (their steps)
    try:
        state = in_child(checkpoint_state, str(folder))
    except RuntimeError as e:
        state = {"path": None, "step": None, "error": str(e)}
    res["checkpoint"] = state
    lost = "error" in state or (saved and (state["step"] is None or state["step"] < max(saved)))
    if res.get("clean") and not (state["path"] or "").split("/")[-1].startswith("hpc_ckpt_"):
        lost = True
    if lost:
        res["problems"].append(f"lost checkpoint: resume source {state}, saves completed at steps {saved}")
    res["lost"] = bool(lost)

    back = start(folder, layout, data, steps, timeout_s, {"point": ""}, restart=True)
    left = back.wait(time.monotonic() + 600)
    back.kill()
    res["resume_codes"] = back.codes
    res["mismatch"] = bool(left) or any(back.codes.values()) or exported(folder) != ref["weights"]
    if res["mismatch"]:
        why = f"exit codes {back.codes}" if left or any(back.codes.values()) else "weights differ"
        res["problems"].append(f"resume mismatch: {why}")
    return res


def table(results: list[dict]) -> tuple[str, dict]:
    rows, cases = [], {}
    for r in results:
        if not r["fired"]:
            continue
        p = r["plan"]
        key = f"{p['layout']} {p['name']} {p['who']}"
        c = cases.setdefault(key, {"trials": 0, "clean_stops": 0, "bad_exit_codes": 0, "hangs": 0,
                                   "lost_checkpoints": 0, "resume_mismatches": 0})
        c["trials"] += 1
        c["clean_stops"] += int(bool(r.get("clean")))
        c["bad_exit_codes"] += int(bool(r.get("bad_exit")))
        c["hangs"] += int(bool(r["hang"]))
        c["lost_checkpoints"] += int(bool(r.get("lost")))
        c["resume_mismatches"] += int(bool(r.get("mismatch")))
    head = ["case", "trials", "clean stops", "bad exit codes", "hangs", "lost checkpoints", "resume mismatches"]
    rows.append("| " + " | ".join(head) + " |")
    rows.append("|---" + "|---:" * (len(head) - 1) + "|")
    order = [f"{lay} {s} {w}" for lay in LAYOUTS for s, w in CASES]
    total = {k: sum(c[k] for c in cases.values()) for k in next(iter(cases.values()), {})}
    for key in [k for k in order if k in cases] + ["total"]:
        c = cases.get(key, total)
        clean = c["clean_stops"] if "SIGTERM" in key or "SIGUSR1" in key or key == "total" else "-"
        rows.append(f"| {key} | {c['trials']} | {clean} | {c['bad_exit_codes']} | {c['hangs']} | "
                    f"{c['lost_checkpoints']} | {c['resume_mismatches']} |")
    return "\n".join(rows), {"cases": cases, "total": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=21)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--layouts", default="dp,pp,dp_shard")
    ap.add_argument("--phases", default=",".join(PHASES), help="where faults are aimed (default: all of them)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps of every run")
    ap.add_argument("--timeout", type=int, default=15, help="parallel.collective_timeout of every run, seconds")
    ap.add_argument("--out", type=Path, default=None, help="default /tmp/chunkflow_faults_<seed>")
    ap.add_argument("--keep", action="store_true", help="keep the folders of trials that passed")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    out = args.out or Path(f"/tmp/chunkflow_faults_{seed}")
    out.mkdir(parents=True, exist_ok=True)
    layouts = args.layouts.split(",")
    if not set(args.phases.split(",")) <= set(PHASES) or not set(layouts) <= set(LAYOUTS):
        ap.error(f"--phases takes {','.join(PHASES)}; --layouts takes {','.join(LAYOUTS)}")
    print(f"fault campaign: seed {seed}, {args.trials} trials, layouts {layouts}, {args.steps} steps, collective "
          f"timeout {args.timeout}s, folders under {out} (rerun: python benchmarks/faults.py --trials {args.trials} "
          f"--seed {seed} --layouts {args.layouts} --phases {args.phases})", flush=True)
    t0 = time.monotonic()
    data = out / "data.jsonl"
    write_data(data)
    refs = {lay: reference(out, lay, data, args.steps, args.timeout) for lay in layouts}
    for lay, ref in refs.items():
        print(f"reference {lay}: {ref['wall_s']:.1f} s, start-up {ref['startup_s']:.1f} s, step {ref['step_s']:.3f} s",
              flush=True)
    rng = random.Random(seed)
    results = []
    for i in range(args.trials):
        lay = layouts[i % len(layouts)]
        plan = sample(rng, lay, refs[lay], args.steps, args.phases.split(","))
        folder = out / f"trial_{i:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.monotonic()
        res = trial(folder, plan, refs[lay], data, args.steps, args.timeout)
        results.append(res)
        where = plan["point"] + (f" +{plan['delay']}s" if plan["point"] in ("startup:delay", "step:inside") else "")
        status = "not reached" if not res["fired"] else "; ".join(res["problems"]) or "ok"
        print(f"trial {i:3d} {lay:8s} {plan['name']:7s} {plan['who']:3s} rank(s) {plan['targets']} at {where} "
              f"(step {plan['step']}): exit {res['codes']} -> {status} [{time.monotonic() - t:.0f} s]", flush=True)
        if res["fired"] and not res["problems"] and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    text, summary = table(results)
    print(text)
    failures = [{"trial": i, "plan": r["plan"], "problems": r["problems"]}
                for i, r in enumerate(results) if r["problems"]]
    result = {"seed": seed, "trials": sum(r["fired"] for r in results), "not_reached": sum(not r["fired"] for r in
              results), "layouts": layouts, "steps": args.steps, "collective_timeout_s": args.timeout,
              "deadline_s": DEADLINE_S, **summary["total"], "sigstop_named_s_max": max(
                  (r["stop_named_s"] for r in results if "stop_named_s" in r), default=None),
              "points": _points(results), "cases": summary["cases"],
              "failures": failures, "wall_s": round(time.monotonic() - t0, 1)}
    print("RESULT " + json.dumps(result), flush=True)
    return 1 if failures else 0


def _points(results: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        if r["fired"]:
            key = r["plan"]["point"].split("@")[0]
            out[key] = out.get(key, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
