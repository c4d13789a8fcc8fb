"""Per-run and per-arm numbers from the trainer's logs (`metrics.jsonl`, `eval.jsonl`), and the Markdown table."""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

VAL_ACC, VAL_L1 = "eval/val_action_accuracy", "eval/val_l1"
OLD_ACC, OLD_L1 = "eval/retention_action_accuracy", "eval/retention_l1"
HELDOUT = "eval/heldout_L_ret"

# (key, header, format) of the table's columns, in order.
COLUMNS = (
    ("new_acc", "B acc", "{:.3f}"),
    ("new_l1", "B L1", "{:.3f}"),
    ("old_acc", "A acc", "{:.3f}"),
    ("old_l1", "A L1", "{:.3f}"),
    ("drift_end", "held-out drift, end", "{:.2e}"),
    ("drift_max", "held-out drift, max", "{:.2e}"),
    ("frac_over_eps", "evals > eps after warm-up", "{:.2f}"),
    ("lambda_min", "lambda min", "{:.3g}"),
    ("lambda_max", "lambda max", "{:.3g}"),
    ("time_ratio", "step time / plain", "{:.2f}"),
)


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_numbers(run_dir: Path, warmup_steps: int) -> Dict[str, Optional[float]]:
    """What one run learned (B), forgot (A), how far held-out features drifted, what lambda did, what a step cost.
    Drift over budget counts evaluations after `warmup_steps` whose held-out drift exceeds that row's epsilon."""
    steps, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    last = evals[-1]
    drift = [(r["step"], r[HELDOUT], r["epsilon"]) for r in evals if HELDOUT in r and r["step"] > 0]
    after = [d > eps for s, d, eps in drift if s > warmup_steps]
    lambdas = [r["lambda"] for r in steps if r.get("lambda") is not None]
    return {
        "new_acc": last.get(VAL_ACC), "new_l1": last.get(VAL_L1),
        "old_acc": last.get(OLD_ACC), "old_l1": last.get(OLD_L1),
        "drift_end": drift[-1][1] if drift else None,
        "drift_max": max(d for _, d, _ in drift) if drift else None,
        "frac_over_eps": float(np.mean(after)) if after else None,
        "lambda_min": min(lambdas) if lambdas else None,
        "lambda_max": max(lambdas) if lambdas else None,
        # Mean, not median: with --craft.retention_interval k the steps alternate between two costs.
        "step_time": float(np.mean([r["step_time_s"] for r in steps[1:]] or [steps[0]["step_time_s"]])),
    }


def arm_numbers(per_seed: Dict[str, Dict[int, dict]], baseline: str = "plain") -> Dict[str, Dict[str, List[float]]]:
    """{arm: {seed: run numbers}} -> {arm: {key: [value per seed]}}, adding each seed's step-time ratio to the
    baseline arm's run of the same seed (same data, same machine load as far as possible)."""
    out = {}
    for arm, seeds in per_seed.items():
        values = {key: [seeds[s][key] for s in sorted(seeds) if seeds[s][key] is not None]
                  for key, _, _ in COLUMNS if key != "time_ratio"}
        if baseline in per_seed:
            values["time_ratio"] = [seeds[s]["step_time"] / per_seed[baseline][s]["step_time"]
                                    for s in sorted(seeds) if s in per_seed[baseline]]
        out[arm] = values
    return out


def mean_std(values: Sequence[float]) -> Optional[tuple]:
    """Mean and sample standard deviation (0 for one value); None when there is nothing."""
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(values: Sequence[float], fmt: str) -> str:
    stats = mean_std(values)
    if stats is None:
        return "-"
    mean, std = stats
    return f"{fmt.format(mean)} ± {fmt.format(std)}" if math.isfinite(std) else fmt.format(mean)


def markdown_table(arms: Dict[str, Dict[str, List[float]]]) -> str:
    header = "| arm | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    rows = [f"| {arm} | " + " | ".join(_cell(values.get(key, []), fmt) for key, _, fmt in COLUMNS) + " |"
            for arm, values in arms.items()]
    return "\n".join([header, rule, *rows])
