"""Run dashboards: one PNG comparing training runs, read from their `metrics.jsonl` and `eval.jsonl`.

Imports numpy and matplotlib only (no torch, no tensorflow), so a finished or running job can be
plotted in a second. Only the two live logs are read: rows a resume moved to
`metrics.superseded-*.jsonl` belong to a discarded timeline and stay out of the picture. A resume that changed
flags (its first row carries `changes`) is marked by a dotted vertical line in the run's colour.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
NOT_LOGGED = "not logged"
COLUMNS = 2


@dataclass
class DashboardConfig:
    projection_window: int = 50  # W: the projection rate at step t is the share of the last W logged steps projected
    drift_log_scale: bool = True  # drift spans decades between the first steps and the budget

    def validate(self) -> None:
        if self.projection_window < 1:
            raise ValueError(f"--projection_window: expected an integer >= 1, found {self.projection_window}")


@dataclass
class RunLog:
    label: str
    metrics: List[dict]  # metrics.jsonl rows, one per training step
    evals: List[dict]  # eval.jsonl rows, one per evaluation (empty when the run has none)


@dataclass(frozen=True)
class Series:
    source: str  # "metrics" or "eval"
    key: str
    style: str  # the legend's words for how this series is drawn, shared by every run


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    series: Tuple[Series, ...]
    log_scale: bool = False


# Line style per position of a series within its panel; colour tells the runs apart.
STYLES = (dict(linestyle="-", marker=None), dict(linestyle="-", marker="o", markersize=3.5),
          dict(linestyle="--", marker="s", markersize=3.5), dict(linestyle=":", marker=None))
EVAL_STYLES = (dict(linestyle="-", marker="o", markersize=3.5), dict(linestyle="--", marker="s", markersize=3.5))


def _eval_pair(key: str, title: str, first: str, second: str, names: Tuple[str, str]) -> Panel:
    return Panel(key, title, (Series("eval", first, names[0]), Series("eval", second, names[1])))


DRIFT_EVAL_KEYS = ("eval/heldout_L_ret", "eval/train_L_ret")  # drawn with the training drift, not in panels of their own
NEW_VS_OLD = ("validation split", "retention mix")
HELDOUT_VS_TRAIN = ("held-out anchors", "training anchors")
EVAL_PANELS = (
    _eval_pair("action_accuracy", "action-token accuracy (eval)", "eval/val_action_accuracy",
               "eval/retention_action_accuracy", NEW_VS_OLD),
    _eval_pair("l1", "action L1 error (eval)", "eval/val_l1", "eval/retention_l1", NEW_VS_OLD),
    _eval_pair("L_act_eval", "L_act (eval)", "eval/val_L_act", "eval/retention_L_act", NEW_VS_OLD),
    _eval_pair("frac_over_eps", "share of anchors with drift > epsilon (eval)", "eval/heldout_frac_over_eps",
               "eval/train_frac_over_eps", HELDOUT_VS_TRAIN),
    _eval_pair("cos", "cosine of anchor features to targets (eval)", "eval/heldout_cos", "eval/train_cos",
               HELDOUT_VS_TRAIN),
)


def training_panels(cfg: DashboardConfig) -> Tuple[Panel, ...]:
    return (
        Panel("L_act", "L_act (training)", (Series("metrics", "L_act", "per step"),)),
        Panel("drift", "retention drift vs epsilon", (
            Series("metrics", "L_ret", "L_ret (training, per step)"),
            *(Series("eval", key, key) for key in DRIFT_EVAL_KEYS),
            Series("metrics", "epsilon", "epsilon"),
        ), log_scale=cfg.drift_log_scale),
        Panel("lambda", "lambda (after each step's update)", (Series("metrics", "lambda", "per step"),)),
        Panel("grad_cos", "grad_cos and projection rate", (Series("metrics", "grad_cos", "grad_cos"),)),
    )


@dataclass
class Dashboard:
    figure: Figure
    axes: Dict[str, object]  # panel key -> its matplotlib Axes; "projection_rate" is grad_cos's twin

    def lines(self, panel: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """The (x, y) data of every labelled line drawn in a panel, read back from the figure itself."""
        return {line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
                for line in self.axes[panel].get_lines() if not line.get_label().startswith("_")}

    def save(self, out: Path) -> None:
        """Write through a temporary file, so a viewer refreshing the PNG never reads half an image."""
        tmp = out.with_name(f".{out.name}.partial")
        FigureCanvasAgg(self.figure).print_png(str(tmp))
        os.replace(tmp, out)


def read_jsonl(path: Path) -> List[dict]:
    """Rows of a JSON-lines log. A last line without its newline is still being written and is left out."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines = lines[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: expected one JSON object per line, found unparsable text ({e})")
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step', found {line[:80]!r}")
        rows.append(row)
    return rows


def load_run(run_dir: Path, label: Optional[str] = None) -> RunLog:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir}: expected a folder holding {METRICS_FILE}, found none")
    metrics, evals = run_dir / METRICS_FILE, run_dir / EVAL_FILE
    if not metrics.is_file() and not evals.is_file():
        raise FileNotFoundError(f"run directory {run_dir}: expected {METRICS_FILE} or {EVAL_FILE}, found neither")
    return RunLog(label=label or run_dir.resolve().name,
                  metrics=read_jsonl(metrics) if metrics.is_file() else [],
                  evals=read_jsonl(evals) if evals.is_file() else [])


def _number(value, key: str, step: int) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise ValueError(f"log field {key!r} at step {step}: expected a number or null, found {value!r}")


def series_xy(rows: Sequence[dict], key: str, gap_skipped: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Steps and values of one field; null, absent and (for training rows) skipped steps become NaN gaps."""
    x = np.array([row["step"] for row in rows], dtype=float)
    y = np.array([math.nan if gap_skipped and row.get("skipped") else _number(row.get(key), key, row["step"])
                  for row in rows], dtype=float)
    return x, y


def skipped_steps(rows: Sequence[dict]) -> np.ndarray:
    return np.array([row["step"] for row in rows if row.get("skipped")], dtype=float)


def changed_steps(rows: Sequence[dict]) -> List[int]:
    """The steps from which a resume ran with changed flags (`changes` in that row)."""
    return [row["step"] for row in rows if row.get("changes")]


def rolling_projection_rate(rows: Sequence[dict], window: int) -> Tuple[np.ndarray, np.ndarray]:
    """Share of the last `window` steps (fewer at the start) whose gradients were projected.

    Only steps that reached the surgery count: skipped steps and plain fine-tuning log `projection: null`.
    """
    steps = [row for row in rows if isinstance(row.get("projection"), bool)]
    flags = np.array([row["projection"] for row in steps], dtype=float)
    totals = np.concatenate([[0.0], np.cumsum(flags)])
    ends = np.arange(1, len(flags) + 1)
    starts = np.maximum(ends - window, 0)
    rate = (totals[ends] - totals[starts]) / (ends - starts) if len(flags) else np.array([])
    return np.array([row["step"] for row in steps], dtype=float), rate


def _eval_panels(runs: Sequence[RunLog]) -> List[Panel]:
    """The known eval groups that some run logged, then one panel per other eval metric found."""
    present = {key for run in runs for row in run.evals for key in row if key.startswith("eval/")}
    panels = [p for p in EVAL_PANELS if any(s.key in present for s in p.series)]
    known = {s.key for p in EVAL_PANELS for s in p.series} | set(DRIFT_EVAL_KEYS)
    panels += [Panel(key, f"{key} (eval)", (Series("eval", key, "eval"),)) for key in sorted(present - known)]
    return panels or [Panel("eval", f"eval metrics (no {EVAL_FILE} rows)", ())]


def _epsilon_rows(run: RunLog) -> Tuple[List[dict], bool]:
    """The budget as the trainer held it per step; for runs without it (plain fine-tuning), the eval rows' value."""
    if any(row.get("epsilon") is not None for row in run.metrics):
        return run.metrics, True
    return run.evals, False


def _draw_panel(ax, panel: Panel, runs: Sequence[RunLog], colors: Sequence[str], widths: Sequence[float]) -> None:
    styles = EVAL_STYLES if all(s.source == "eval" for s in panel.series) else STYLES
    missing, drawn_series = [], set()
    for run, color, width in zip(runs, colors, widths):
        drawn = False
        for position, s in enumerate(panel.series):
            if s.key == "epsilon":
                rows, gap = _epsilon_rows(run)
            else:
                rows, gap = (run.metrics, True) if s.source == "metrics" else (run.evals, False)
            x, y = series_xy(rows, s.key, gap_skipped=gap)
            if not np.isfinite(y).any():
                continue
            label = run.label if len(panel.series) == 1 else f"{run.label} · {s.key}"
            ax.plot(x, y, color=color, label=label, linewidth=width, **styles[position])
            drawn_series.add(position)
            drawn = drawn or s.key != "epsilon"
        if panel.series and panel.series[0].source == "metrics" and len(skipped := skipped_steps(run.metrics)):
            ax.plot(skipped, np.full(len(skipped), 0.03), "x", color=color, markersize=6,
                    transform=blended_transform_factory(ax.transData, ax.transAxes), label=f"_{run.label} skipped")
        if not drawn:
            missing.append(run.label)
        for step in changed_steps(run.metrics) if drawn else ():
            ax.axvline(step, color=color, linestyle=":", linewidth=1.2, label=f"_{run.label} changed")
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(missing) == len(runs):
        ax.text(0.5, 0.5, NOT_LOGGED, transform=ax.transAxes, ha="center", va="center", color="gray", fontsize=12)
        ax.set(xticks=[], yticks=[], xlabel="")
        return
    if panel.log_scale and all((line.get_ydata()[np.isfinite(line.get_ydata())] > 0).any()
                               for line in ax.get_lines() if not line.get_label().startswith("_")):
        ax.set_yscale("log", nonpositive="mask")
    if missing:
        ax.set_title(f"{NOT_LOGGED}: {', '.join(missing)}", fontsize=8, loc="right", color="gray")
    if len(panel.series) > 1:
        shown = sorted(drawn_series)
        ax.legend([Line2D([], [], color="black", **styles[i]) for i in shown], [panel.series[i].style for i in shown],
                  fontsize=7, loc="best", framealpha=0.8)


def _draw_projection_rate(ax, runs: Sequence[RunLog], colors: Sequence[str], widths: Sequence[float], window: int):
    """A twin axis on the grad_cos panel: projection happens below the zero line, the rate says how often."""
    ax.axhline(0.0, color="gray", linewidth=0.8, label="_zero")
    ax.set_ylabel("grad_cos (solid)", fontsize=8)
    twin = ax.twinx()
    for run, color, width in zip(runs, colors, widths):
        x, rate = rolling_projection_rate(run.metrics, window)
        if len(x):
            twin.plot(x, rate, color=color, linestyle="--", linewidth=width * 0.8, alpha=0.8,
                      label=f"{run.label} · projection rate")
    twin.set_ylim(-0.03, 1.03)
    twin.set_ylabel(f"share projected, last {window} steps (dashed)", fontsize=8)
    twin.tick_params(labelsize=8)
    return twin


def build_dashboard(runs: Sequence[RunLog], cfg: DashboardConfig = DashboardConfig()) -> Dashboard:
    """One panel per quantity, every run overlaid in its own colour; the figure legend names the runs."""
    cfg.validate()
    panels = [*training_panels(cfg), *_eval_panels(runs)]
    rows = math.ceil(len(panels) / COLUMNS)
    figure = Figure(figsize=(6.8 * COLUMNS, 3.3 * rows + 0.9), layout="constrained")
    grid = figure.subplots(rows, COLUMNS, squeeze=False).ravel()
    for ax in grid[len(panels):]:
        ax.set_visible(False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    widths = [1.2 + 0.9 * (len(runs) - 1 - i) for i in range(len(runs))]  # earlier runs wider: equal curves stay visible
    axes = {}
    for ax, panel in zip(grid, panels):
        _draw_panel(ax, panel, runs, colors, widths)
        axes[panel.key] = ax
    axes["projection_rate"] = _draw_projection_rate(axes["grad_cos"], runs, colors, widths, cfg.projection_window)
    handles = [Line2D([], [], color=c, linewidth=w) for c, w in zip(colors, widths)]
    names = [run.label for run in runs]
    if any(len(skipped_steps(run.metrics)) for run in runs):
        handles.append(Line2D([], [], color="gray", marker="x", linestyle="none"))
        names.append("skipped step (non-finite)")
    if any(changed_steps(run.metrics) for run in runs):
        handles.append(Line2D([], [], color="gray", linestyle=":"))
        names.append("resumed with changed flags (changes.jsonl)")
    figure.legend(handles, names, loc="outside upper center", ncols=min(len(names), 6), fontsize=9, frameon=False)
    return Dashboard(figure=figure, axes=axes)


def check_output(out: Path) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out: expected a file name ending in .png, found {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--out: expected a file name, found the folder {out}")
    return out


def load_runs(run_dirs: Sequence[Path], labels: Optional[Sequence[str]] = None) -> List[RunLog]:
    """Every run's logs, labelled (folder names unless `labels`), or one error naming the bad argument."""
    if not run_dirs:
        raise ValueError("expected at least one run directory, found none")
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"--labels: expected one label per run directory ({len(run_dirs)}), found {len(labels)}")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [run.label for run in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"run labels must differ to tell the runs apart, found {names}; pass --labels")
    return runs


def plot_runs(run_dirs: Sequence[Path], out: Path, labels: Optional[Sequence[str]] = None,
              cfg: DashboardConfig = DashboardConfig()) -> Dashboard:
    """Check every argument and read every log before drawing; then write `out` (replacing an older dashboard)."""
    cfg.validate()
    out = check_output(out)
    dashboard = build_dashboard(load_runs(run_dirs, labels), cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    dashboard.save(out)
    return dashboard
