"""The frontier of one setting: old-task L1 increase against new-task L1, one curve per method over its knob."""

import math
from pathlib import Path
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from summary import half_width  # noqa: E402


def _bar(values) -> float:
    """95 % half-width to draw; none for a single seed (its interval is unbounded)."""
    h = half_width(values)
    return h if math.isfinite(h) else 0.0


def plot_frontier(curves: Dict[str, List[Tuple[str, dict]]], title: str, out: Path) -> Path:
    """`curves`: {label: [(knob label, {"new_l1": [per seed], "old_increase": [per seed]}), ...] in knob order}.
    Points are means over seeds; bars the 95 % t-intervals in both axes. Down and left is better."""
    fig, ax = plt.subplots(figsize=(10, 7))
    colours = plt.get_cmap("tab10")
    for i, (label, points) in enumerate(curves.items()):
        points = [(knob, n) for knob, n in points if n["new_l1"] and n["old_increase"]]
        if not points:
            continue
        x = np.array([np.mean(n["new_l1"]) for _, n in points])
        y = np.array([np.mean(n["old_increase"]) for _, n in points])
        ax.errorbar(x, y, xerr=[_bar(n["new_l1"]) for _, n in points],
                    yerr=[_bar(n["old_increase"]) for _, n in points], color=colours(i % 10), ms=4, lw=1.2,
                    marker="o" if i < 10 else "s", ls="-" if i < 10 else "--", capsize=2, label=label)  # past 10
        for (knob, _), xi, yi in zip(points, x, y):
            ax.annotate(knob, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7, color=colours(i % 10))
    ax.axhline(0.0, color="black", lw=0.8, ls=":")
    ax.set_xlabel("new-task validation L1, end (lower: learned more)")
    ax.set_ylabel("old-task (A) validation L1 increase over the run's step 0 (lower: forgot less)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
