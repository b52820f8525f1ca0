"""Child process of tests/test_plan.py: a short real run with chunk.size=auto; prints one JSON line.

Peak memory, measured: the resident high-water mark at the end of fit (``VmHWM``) minus the resident
set just before the model is built (a callback's ``setup`` hook runs before ``configure_model``), so
imports, the interpreter and the data pipeline are not counted, as the estimate does not count them.
Predicted: the planner's peak for the setting it recommended (the same call ``train.py`` makes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from chunkflow_pl.plan.core import plan_chunking  # noqa: E402
from chunkflow_pl.plan.settings import model_config, plan_inputs  # noqa: E402
from chunkflow_pl.utils.host_memory import current_rss_bytes, peak_rss_bytes  # noqa: E402
from train import train  # noqa: E402


class RSSProbe(L.Callback):
    def __init__(self) -> None:
        self.base = self.peak = 0

    def setup(self, trainer, pl_module, stage) -> None:
        self.base = current_rss_bytes()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.peak = peak_rss_bytes()


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    inputs = plan_inputs(cfg, model_config(cfg.model), k=None)
    best = plan_chunking(inputs.model, inputs.spec, inputs.sample, inputs.epoch).best
    probe = RSSProbe()
    out = train(cfg, callbacks=[probe])
    stats = out["module"].last_stats
    print(json.dumps({"chunk_size": out["datamodule"].chunk_size, "k": out["trainer"].strategy.chunk_k,
                      "planned": [best.chunk_size, best.k], "predicted": best.peak,
                      "measured": probe.peak - probe.base, "base": probe.base, "steps": out["trainer"].global_step,
                      "peak_state_bytes": stats.peak_state_bytes}))


if __name__ == "__main__":
    main(sys.argv[1:])
