"""Curves over training steps, every arm overlaid (mean over seeds, shaded from the lowest to the highest seed)."""

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from summary import HELDOUT, OLD_ACC, OLD_L1, VAL_ACC, VAL_L1, read_jsonl  # noqa: E402

# (source file, key, panel title, log y-axis), row by row
PANELS = (
    ("eval.jsonl", HELDOUT, "held-out anchor drift (MSE)", True),
    ("metrics.jsonl", "lambda", "lambda (log axis: zeros not drawn)", True),
    ("eval.jsonl", OLD_ACC, "A (old tasks) validation action accuracy", False),
    ("eval.jsonl", OLD_L1, "A (old tasks) validation L1 (lower is better)", False),
    ("eval.jsonl", VAL_ACC, "B (new data) validation action accuracy", False),
    ("eval.jsonl", VAL_L1, "B (new data) validation L1 (lower is better)", False),
)


def _series(run_dirs: List[Path], source: str, key: str):
    """Steps logged by every seed, and the value of each seed at those steps (None when nothing was logged)."""
    per_run = []
    for run_dir in run_dirs:
        rows = [r for r in read_jsonl(run_dir / source) if r.get(key) is not None]
        per_run.append({r["step"]: r[key] for r in rows})
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    if not steps:
        return None
    return np.array(steps), np.array([[d[s] for s in steps] for d in per_run])


def plot_setting(runs: Dict[str, List[Path]], epsilon: float, title: str, out: Path) -> Path:
    """`runs`: {arm: run folders, one per seed}. Drift panels draw the tuned budget epsilon as a dashed line."""
    fig, axes = plt.subplots(3, 2, figsize=(14, 13))
    colours = plt.get_cmap("tab10")
    for ax, (source, key, panel, log) in zip(axes.flat, PANELS):
        plotted = False
        for i, (arm, dirs) in enumerate(runs.items()):
            series = _series(dirs, source, key)
            if series is None:
                continue
            steps, values = series
            if log:
                values = np.where(values > 0, values, np.nan)
            ax.plot(steps, values.mean(axis=0), color=colours(i % 10), label=arm, lw=1.5)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colours(i % 10), alpha=0.15, lw=0)
            plotted = True
        if key == HELDOUT:
            ax.axhline(epsilon, color="black", ls="--", lw=1, label=f"tuned epsilon {epsilon:.2g}")
        if log and plotted:
            ax.set_yscale("log")
        ax.set_title(panel if plotted else f"{panel}: not logged")
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


