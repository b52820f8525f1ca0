"""Start the ranks of a ``train.py`` run as a launcher does, cheaply enough for a campaign of hundreds of runs.

Importing torch + Lightning + train.py costs ~6 s of CPU per process (13 s wall on the shared 2-core box), more
than a tiny run's training. So the campaign's process imports ``train`` once and forks one child per rank; each
child gets the environment torchrun gives a worker (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID: Lightning's TorchElasticEnvironment, ranks started externally), its own
argv and log file, holds SIGTERM/SIGUSR1 as train.py's first line does, and runs train.py's Hydra entry point
(``train.run``: the exit code of the README table). What the children do not exercise: signals during Python's own
imports, and interpreter finalisation (a child ends with ``os._exit`` after atexit handlers). The parent must stay
fork-safe: it never runs a torch operation (checkpoint checks run in a forked child, ``in_child``).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(BENCH), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per rank

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import train  # noqa: E402  (once, in the parent: every child inherits it)
from chunkflow_pl.utils.held_signals import SIGNALS, take_held_signal  # noqa: E402

for _s in SIGNALS:  # importing train.py held them (its first lines): this process is the campaign, not a rank
    signal.signal(_s, signal.SIG_DFL)


# train.py's own entry point, with its config folder by absolute path (Hydra finds a relative one only when
# train.py is __main__).
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def train_main(cfg: DictConfig) -> None:
    sys.exit(train.run(cfg))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{BENCH}", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)
    return env


def _child(argv: list[str], env: dict[str, str], log: Path) -> None:
    """In the forked child: become rank ``env['RANK']`` of a fresh train.py process; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        take_held_signal()  # a fresh process holds nothing yet
        train.hold_signals()  # what a fresh train.py process does first
        faulthandler.register(signal.SIGUSR2, all_threads=True)  # a hung rank's stacks, before it is killed
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [str(ROOT / "train.py"), *argv]
        try:
            train_main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


@dataclass
class Run:
    """The ranks of one launch: pids, exit codes (``-N``: killed by signal N, as subprocess reports it), exit times."""
    folder: Path
    pids: dict[int, int]
    codes: dict[int, int] = field(default_factory=dict)
    ended: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    name: str = "rank"  # logs: <folder>/<name><rank>.log

    def poll(self) -> bool:
        """Reap what has ended; True when every rank has."""
        for r, pid in self.pids.items():
            if r in self.codes:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 1 << 8
            if got:
                self.codes[r] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                self.ended[r] = time.monotonic()
        return len(self.codes) == len(self.pids)

    def wait(self, deadline: float, watch: Callable[[Run], None] | None = None) -> list[int]:
        """Until every rank ended or ``deadline`` (monotonic) passed; the ranks still running then."""
        while not self.poll() and time.monotonic() < deadline:
            if watch is not None:
                watch(self)
            time.sleep(0.02)
        return [r for r in self.pids if r not in self.codes]

    def kill(self) -> None:
        """End what is left (a hung rank first writes its Python stacks to its log: SIGUSR2, faulthandler)."""
        for r, pid in self.pids.items():
            if r not in self.codes:
                try:
                    os.kill(pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        for r, pid in self.pids.items():
            if r not in self.codes:
                for s in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        os.kill(pid, s)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + 30
        while not self.poll() and time.monotonic() < deadline:
            time.sleep(0.02)

    def log(self, rank: int) -> str:
        try:
            return (self.folder / f"{self.name}{rank}.log").read_text(errors="replace")
        except OSError:
            return ""


def launch(folder: Path, world: int, argv: list[str], extra_env: dict[str, str] | None = None,
           name: str = "rank") -> Run:
    """Fork ``world`` ranks of ``train.py argv`` (their logs: ``folder/<name><r>.log``)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    pids = {}
    for r in range(world):
        env = {**base_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": folder.name, **(extra_env or {})}
        pid = os.fork()
        if pid == 0:
            _child(argv, env, folder / f"{name}{r}.log")
        pids[r] = pid
    return Run(folder, pids, name=name)


def in_child(fn: Callable[..., object], *args: object, timeout: float = 120) -> object:
    """``fn(*args)`` in a forked child (it may use torch: the parent stays fork-safe); its repr'able result."""
    import pickle

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            out = ("ok", fn(*args))
        except BaseException as e:  # reported, not raised: the child must end here
            out = ("error", f"{type(e).__name__}: {e}")
        with os.fdopen(wfd, "wb") as f:
            pickle.dump(out, f)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data) if data else ("error", "no result")
    if status != "ok":
        raise RuntimeError(value)
    return value
