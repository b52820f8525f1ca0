"""Every N steps, draw the executed schedule of a step as a Gantt chart (stage x time) and log it.

On a recorded step every rank times each action it runs (``ChunkExecutor``'s clock, from an origin
the ranks of a replica share, see ``schedule/runner.py``); rank 0 gathers the stages of
replica 0 (data-parallel rank 0) and writes, under ``<run dir>/<dirname>/``::

    step_000009.png        executed: forward / recompute / backward / weight (split backward) / idle per stage
    step_000009_sim.png    (pp > 1) the simulator running the same plan on the durations just measured,
                           on the same time axis: what the plan's order alone costs in bubbles; the
                           gap to the executed chart is message and runtime overhead
    step_000009.json       every action with its times (messages included), per-stage peak live
                           activations and caps, the plan, the chunks, both bubble fractions

With virtual stages (``parallel.virtual_stages``) a row is a rank and its blocks are told apart (hatched, named
``chunk@block`` on the bars and on the row's label); the replay times each action by its block and runs each
rank's interleaved order (``simulator.py``, "Virtual stages").

The executed chart goes to every logger that takes images (W&B ``log_image``); loggers without
images get the files only. The bubble fractions are logged as metrics ``pipeline/bubble`` and
``pipeline/bubble_replayed``. Recording costs a barrier and a clock reading per action (on CUDA a
device synchronisation per action, so only recorded steps are slower).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch.distributed as dist

from chunkflow_pl.schedule.cost import MeasuredCost
from chunkflow_pl.schedule.pipeline_actions import Op
from chunkflow_pl.schedule.simulator import simulate
from chunkflow_pl.schedule.timeline import TimedEvent, draw_timeline, timeline_stats

log = logging.getLogger(__name__)
COMPUTE = {op.value for op in Op}


class PipelineTimeline(L.Callback):
    def __init__(self, every_n_train_steps: int = 100, simulate: bool = True, dirname: str = "timeline") -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"callbacks.timeline.every_n_train_steps={every_n_train_steps} must be >= 0 (0: off)")
        self.every = int(every_n_train_steps)
        self.simulate = simulate
        self.dirname = dirname
        self._due = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._due = self.every > 0 and (trainer.global_step + 1) % self.every == 0
        if hasattr(trainer.strategy, "record_timeline"):
            trainer.strategy.record_timeline = self._due

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        strategy = trainer.strategy
        if not self._due or not hasattr(strategy, "record_timeline"):
            return
        strategy.record_timeline = self._due = False
        mine = strategy.last_timeline
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size() if trainer.is_global_zero else None
            dist.gather_object(mine, every, dst=0)
        else:
            every = [mine]
        if trainer.is_global_zero:
            records = sorted((r for r in every if r is not None and r.dp_rank == 0), key=lambda r: r.stage)
            if records:
                self._write(trainer, records, batch)

    def _write(self, trainer, records, batch) -> None:
        pp = len(records)
        step = records[0].step
        out = Path(trainer.default_root_dir) / self.dirname
        # virtual stages: events carry their block as a fifth field, and each chart row is a rank
        events = [TimedEvent(r.stage, op, c, t0, t1, *blk) for r in records for op, c, t0, t1, *blk in r.events
                  if op in COMPUTE]
        measured = timeline_stats(events, pp)
        png = draw_timeline(events, out / f"step_{step:06d}.png", pp,
                            title=f"step {step}: executed on {pp} stage(s), bubble {measured.bubble_total:.1%}")
        body = {
            "step": step, "pp": pp,
            "stages": [{"stage": r.stage, "rank": r.rank, "peak_live": r.peak_live, "cap": r.cap,
                        "events": [list(e) for e in r.events]} for r in records],
            "plan": records[0].plan_text,
            "chunks": [[list(seg) for seg in c.segments] for c in batch.chunks],
            "seq_lens": list(batch.seq_lens),
            "measured": {"step_time": measured.step_time, "bubble": measured.bubble_total,
                         "bubble_by_stage": list(measured.bubble)},
        }
        metrics = {"pipeline/bubble": measured.bubble_total}
        plan = records[0].extra.get("plan")
        # one stage: the replay would be the chart itself; virtual stages: durations by block (plan.pp of them)
        if self.simulate and plan is not None and pp > 1:
            durations = {(e.stage if e.block is None else e.block, Op(e.op), e.chunk): e.end - e.start
                         for e in events}
            sim = simulate(plan, [c.segments for c in batch.chunks], batch.seq_lens,
                           MeasuredCost(durations, plan.pp))
            sim_events = [e._replace(block=b) for e, b in zip(sim.events, sim.event_blocks)] or sim.events
            draw_timeline(sim_events, out / f"step_{step:06d}_sim.png", pp, time_axis=measured.step_time,
                          title=f"step {step}: the same plan simulated on the measured durations, "
                                f"bubble {sim.bubble_total:.1%}")
            body["replayed"] = {"step_time": sim.step_time, "bubble": sim.bubble_total,
                                "bubble_by_stage": list(sim.bubble), "peak_live": list(sim.peak_live)}
            metrics["pipeline/bubble_replayed"] = sim.bubble_total
        (out / f"step_{step:06d}.json").write_text(json.dumps(body) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="pipeline/timeline", images=[str(png)], step=trainer.global_step)
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info("step %d timeline: %s (bubble %.1f%%)", step, png, 100 * measured.bubble_total)
