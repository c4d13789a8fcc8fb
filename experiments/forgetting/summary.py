"""Per-run numbers from the trainer's logs (`metrics.jsonl`, `eval.jsonl`), 95 % intervals over seeds, the tables."""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

VAL_ACC, VAL_L1 = "eval/val_action_accuracy", "eval/val_l1"
OLD_ACC, OLD_L1 = "eval/retention_action_accuracy", "eval/retention_l1"
HELDOUT = "eval/heldout_L_ret"

# Two-sided 95 % quantiles of Student's t, by degrees of freedom (a table: nothing here needs scipy).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# (key, header, format) of the table's columns, in order.
COLUMNS = (
    ("new_l1", "B L1", "{:.3f}"),
    ("old_increase", "A L1 increase", "{:.3f}"),
    ("old_l1", "A L1", "{:.3f}"),
    ("new_acc", "B acc", "{:.3f}"),
    ("old_acc", "A acc", "{:.3f}"),
    ("drift_end", "held-out drift, end (the run's cache, its loss)", "{:.2e}"),
    ("lambda_max", "lambda max", "{:.3g}"),
    ("step_time", "step time (s)", "{:.2f}"),
)


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_numbers(run_dir: Path) -> Dict[str, Optional[float]]:
    """What one run learned (B), forgot (A: also as the increase of A's L1 over the run's own step-0 evaluation),
    how far held-out features drifted (in the loss of the run's anchor cache), what lambda did, what a step cost."""
    steps, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    first, last = evals[0], evals[-1]
    drift = [r[HELDOUT] for r in evals if HELDOUT in r and r["step"] > 0]
    lambdas = [r["lambda"] for r in steps if r.get("lambda") is not None]
    return {
        "new_acc": last.get(VAL_ACC), "new_l1": last.get(VAL_L1),
        "old_acc": last.get(OLD_ACC), "old_l1": last.get(OLD_L1),
        "old_increase": last[OLD_L1] - first[OLD_L1] if first["step"] == 0 and OLD_L1 in first else None,
        "drift_end": drift[-1] if drift else None,
        "lambda_max": max(lambdas) if lambdas else None,
        # Mean, not median: with --craft.retention_interval k the steps alternate between two costs.
        "step_time": float(np.mean([r["step_time_s"] for r in steps[1:]] or [steps[0]["step_time_s"]])),
    }


def half_width(values: Sequence[float]) -> float:
    """Of the 95 % t-interval of the mean over seeds; infinite for one value."""
    n = len(values)
    if n < 2:
        return math.inf
    if n - 1 > len(T975):
        raise ValueError(f"{n} values: the t table stops at {len(T975) + 1}")
    return T975[n - 2] * float(np.std(values, ddof=1)) / math.sqrt(n)


def interval(values: Sequence[float]) -> Tuple[float, float]:
    mean, h = float(np.mean(values)), half_width(values)
    return mean - h, mean + h


def group_numbers(per_run: Dict[str, List[dict]]) -> Dict[str, Dict[str, List[float]]]:
    """{row: [run numbers per seed]} -> {row: {key: [value per seed]}} (values a run lacks are left out)."""
    return {row: {key: [r[key] for r in runs if r.get(key) is not None] for key, _, _ in COLUMNS}
            for row, runs in per_run.items()}


def _cell(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    mean, h = float(np.mean(values)), half_width(values)
    return f"{fmt.format(mean)} ± {fmt.format(h)}" if math.isfinite(h) else fmt.format(mean)


def markdown_table(rows: Dict[str, Dict[str, List[float]]]) -> str:
    """One row per entry: mean ± 95 % half-width over its seeds (n), or the value alone for one seed."""
    header = "| row | n | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 2) + "|"
    lines = [f"| {row} | {len(values['new_l1'])} | " + " | ".join(_cell(values[key], fmt) for key, _, fmt in COLUMNS)
             + " |" for row, values in rows.items()]
    return "\n".join([header, rule, *lines])
