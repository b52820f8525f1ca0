"""``pip install .`` installs the library only: one top-level import name, ``chunkflow_pl``.

The application (``train.py``, ``conf/``, ``callbacks/``) runs from the repository; a top-level ``callbacks``
package in site-packages would shadow, or be shadowed by, any other ``callbacks`` of the user's environment.
The wheel is built from a copy of the sources (the build writes ``build/`` and ``*.egg-info`` beside them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_the_wheel_holds_only_chunkflow_pl(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train.py"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("chunkflow_pl", "callbacks", "conf", "benchmarks"):  # the app's folders sit beside, as in a checkout
        shutil.copytree(ROOT / folder, src / folder, ignore=skip)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("chunkflow_pl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"chunkflow_pl", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    assert "chunkflow_pl/schedule/step_flops.py" in names and "chunkflow_pl/strategy/preemption.py" in names
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(info).decode().split() == ["chunkflow_pl"]
