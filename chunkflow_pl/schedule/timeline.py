"""Timed compute events of a step (simulated or recorded), their busy/idle summary, and a Gantt chart.

An event is ``(stage, op, chunk, start, end)`` with ``op`` one of ``"forward"``, ``"recompute"``,
``"backward"``, ``"weight"`` (``Op.value``; ``"weight"`` only with split backward). The simulator
produces them; a callback that times a real run can produce the same tuples and reuse
``timeline_stats`` and ``draw_timeline``. Idle is everything between 0 and the step's end that no
event covers::

    time      0    1    2    3    4    5    6
    stage 0   [F0 ][F1 ]......[B0      ][B1      ]
    stage 1   .....[F0 ][B0      ][F1 ][B1      ]       "." = idle (bubble)

``draw_timeline`` imports matplotlib only when called (planning never needs it) and draws on an
Agg canvas without pyplot, so it leaves no global state behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

# One colour per op, and for idle time; hex so tests can look for exact pixels.
COLORS = {"forward": "#1f77b4", "backward": "#2ca02c", "recompute": "#ff7f0e", "weight": "#9467bd",
          "idle": "#e6e6e6"}


class TimedEvent(NamedTuple):
    stage: int
    op: str  # "forward" | "recompute" | "backward" | "weight"
    chunk: int
    start: float
    end: float


@dataclass(frozen=True)
class TimelineStats:
    step_time: float  # end of the last event (the step starts at 0)
    busy: tuple[float, ...]  # summed event time, by stage
    bubble: tuple[float, ...]  # idle / step_time, by stage
    bubble_total: float  # idle of all stages / (stages * step_time)


def timeline_stats(events: Sequence[TimedEvent], num_stages: int) -> TimelineStats:
    """Busy time and bubble fraction per stage and overall (0 bubble for an empty timeline)."""
    step = max((e.end for e in events), default=0.0)
    busy = [0.0] * num_stages
    for e in events:
        busy[e.stage] += e.end - e.start
    if step <= 0:
        return TimelineStats(0.0, tuple(busy), (0.0,) * num_stages, 0.0)
    idle = [step - b for b in busy]
    return TimelineStats(step, tuple(busy), tuple(i / step for i in idle), sum(idle) / (num_stages * step))


def ascii_timeline(events: Sequence[TimedEvent], num_stages: int, unit: float = 1.0) -> str:
    """Text Gantt chart, one column per ``unit`` of time: ``F3``/``R3``/``B3``/``W3`` per column, ``.`` idle."""
    step = max((e.end for e in events), default=0.0)
    cols = round(step / unit)
    width = max([2] + [len(f"F{e.chunk}") for e in events])
    rows = [["."] * cols for _ in range(num_stages)]
    for e in events:
        for col in range(round(e.start / unit), round(e.end / unit)):
            rows[e.stage][col] = f"{e.op[0].upper()}{e.chunk}"
    head = "time     " + " ".join(f"{c:<{width}}" for c in range(cols))
    lines = [head] + [f"stage {s:<2} " + " ".join(f"{x:<{width}}" for x in r) for s, r in enumerate(rows)]
    return "\n".join(line.rstrip() for line in lines)


def draw_timeline(
    events: Sequence[TimedEvent],
    path: str | Path,
    num_stages: int | None = None,
    *,
    title: str | None = None,
    labels: bool = True,
    legend: bool = True,
    time_axis: float | None = None,
    dpi: int = 100,
    width_in: float = 12.0,
) -> Path:
    """Write a Gantt chart (stage x time; forward, backward, recompute, idle coloured) to a PNG file.

    Stage 0 is the top row. ``labels`` writes chunk numbers into bars wide enough to hold them;
    ``legend`` adds a colour key; ``time_axis`` sets the axis length (default: the step's end), so
    charts of two plans can share one scale.
    Bars are drawn without antialiasing (and, with ``labels=False``, without edges), so each op's
    pixels carry its exact colour.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = num_stages if num_stages is not None else 1 + max((e.stage for e in events), default=0)
    step = max((e.end for e in events), default=1.0) or 1.0
    fig = Figure(figsize=(width_in, 0.5 * n + 1.2), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in range(n):
        ax.broken_barh([(0.0, step)], (s - 0.4, 0.8), facecolors=COLORS["idle"], antialiased=False, linewidth=0)
    # Thin white separators between bars when labelled (for reading); none otherwise (exact pixel colours).
    edge = dict(edgecolor="white", linewidth=0.5) if labels else dict(linewidth=0)
    ops = ("forward", "recompute", "backward") + (("weight",) if any(e.op == "weight" for e in events) else ())
    for op in ops:
        for s in range(n):
            bars = [(e.start, e.end - e.start) for e in events if e.op == op and e.stage == s]
            if bars:
                ax.broken_barh(bars, (s - 0.4, 0.8), facecolors=COLORS[op], antialiased=False, **edge)
    if labels:
        min_width = step / 60  # about two characters at the default size
        for e in events:
            if e.end - e.start >= min_width:
                ax.text((e.start + e.end) / 2, e.stage, str(e.chunk), ha="center", va="center", fontsize=7,
                        color="white")
    ax.set_xlim(0, max(step, time_axis or 0.0))
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_yticks(range(n), [f"stage {s}" for s in range(n)])
    ax.set_xlabel("time")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in ops + ("idle",)],
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
