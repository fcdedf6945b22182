"""PNG plots of a run: the learning curve, and test results beside their baselines (matplotlib, Agg backend).

Drawing only: the callers decide what goes in a panel (evaluation knows which metric heads a family and which
baseline stands beside it; the learning curve's metric per family comes from the callback). Nothing here imports
the rest of p5rec, so every module may use it. Each function writes one PNG atomically and returns its path, or
None when there is nothing to draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p5rec import atomic

DPI = 110
# bar colours by role: the model's seen / unseen templates, and baselines
COLOURS = {"seen": "#1f77b4", "unseen": "#9ecae1", "baseline": "#7f7f7f", "other": "#ff7f0e"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Render the figure in memory, then write it atomically (a crash leaves the old PNG whole)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    return atomic.write_bytes(Path(path), buffer.getvalue())


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    cols = min(cols, max(n, 1))
    return math.ceil(n / cols), cols


# ------------------------------------------------------------------------------------------------ learning curve
def learning_curve_plot(run_dir: str | Path, metric_of: Mapping[str, str], out: str | Path | None = None
                        ) -> Path | None:
    """``learning_curve.png``: the training and validation loss over steps (``trainer_state.json``'s log and
    ``learning_curve.json``), then one panel per family (and protocol) of the learning curve with its metric
    (``metric_of``: family -> metric name, e.g. ``{"sequential": "NDCG@10", "rating": "RMSE"}``)."""
    run_dir = Path(run_dir)
    curve_file = run_dir / "learning_curve.json"
    points = json.loads(curve_file.read_text()) if curve_file.is_file() else []
    state_file = run_dir / "trainer_state.json"
    history = json.loads(state_file.read_text()).get("log_history", []) if state_file.is_file() else []
    train_loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    eval_loss = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not eval_loss:
        eval_loss = [(p["step"], p["eval_loss"]) for p in points if p.get("eval_loss") is not None]
    keys = list(dict.fromkeys(k for p in points for k, v in p.items() if isinstance(v, dict)))
    if not train_loss and not eval_loss and not keys:
        return None
    plt = _pyplot()
    rows, cols = _grid(1 + len(keys))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
    ax = axes[0][0]
    if train_loss:
        ax.plot(*zip(*train_loss), "-", color=COLOURS["seen"], label="training loss")
    if eval_loss:
        ax.plot(*zip(*eval_loss), "o-", color=COLOURS["other"], label="validation loss")
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    for i, key in enumerate(keys, start=1):
        ax = axes[i // cols][i % cols]
        family = key.split("/")[0]
        metric = metric_of.get(family)
        pts = [(p["step"], p[key][metric]) for p in points if isinstance(p.get(key), dict) and metric in p[key]]
        if not pts:
            ax.set_visible(False)
            continue
        template = next(p[key]["template"] for p in points if isinstance(p.get(key), dict))
        ax.plot(*zip(*pts), "o-", color=COLOURS["seen"])
        ax.set_title(f"{key}: {metric} ({template}, validation)", fontsize=9)
        ax.set_xlabel("step")
    for j in range(1 + len(keys), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    for row in axes:
        for a in row:
            a.grid(alpha=0.3)
    fig.suptitle(f"{run_dir.name}: learning curve", fontsize=10)
    fig.tight_layout()
    path = _save(fig, Path(out) if out else run_dir / "learning_curve.png")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ bar panels
@dataclass
class Bar:
    label: str
    value: float
    role: str = "seen"  # seen, unseen, baseline or other: the bar's colour


@dataclass
class Panel:
    """One chart: a metric's bars (the model's beside its baselines)."""

    title: str
    metric: str
    bars: list[Bar] = field(default_factory=list)
    lower_is_better: bool = False


def bar_panels(panels: Sequence[Panel], out: str | Path, title: str = "", cols: int = 3) -> Path | None:
    """Horizontal bar charts, one per panel, values written beside the bars; None if no panel has a bar."""
    panels = [p for p in panels if any(b.value is not None and math.isfinite(b.value) for b in p.bars)]
    if not panels:
        return None
    plt = _pyplot()
    rows, cols = _grid(len(panels), cols)
    height = max(2.2, 0.42 * max(len(p.bars) for p in panels) + 1.0)
    labels = max(len(b.label) for p in panels for b in p.bars)  # room for the longest label beside each chart
    fig, axes = plt.subplots(rows, cols, figsize=((2.8 + 0.07 * labels) * cols, height * rows), squeeze=False)
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        bars = [b for b in panel.bars if b.value is not None and math.isfinite(b.value)]
        y = list(range(len(bars)))[::-1]
        ax.barh(y, [b.value for b in bars], color=[COLOURS.get(b.role, COLOURS["other"]) for b in bars])
        ax.set_yticks(y, [b.label for b in bars], fontsize=8)
        top = max((b.value for b in bars), default=0) or 1.0
        for yy, b in zip(y, bars):
            ax.text(b.value + top * 0.01, yy, f"{b.value:.4f}" if abs(b.value) < 1.5 else f"{b.value:.2f}",
                    va="center", fontsize=7)
        ax.set_xlim(0, top * 1.3)
        better = "lower is better" if panel.lower_is_better else "higher is better"
        ax.set_title(f"{panel.title}\n{panel.metric} ({better})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = _save(fig, Path(out))
    plt.close(fig)
    return path
