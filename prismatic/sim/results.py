"""Episode outcomes on disk (one JSON line each, so an interrupted evaluation resumes) and their summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval: sensible at 0% and 100% and for the few trials of one task, unlike p +- z*se."""
    if trials == 0:
        return 0.0, 1.0
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


class EpisodeLog:
    """`episodes.jsonl`: rows {"task_id", "task", "episode", "success", "steps", "error"?}, appended as
    episodes end."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> list[dict[str, Any]]:
        """The finished episodes; a last line cut off by an interruption is dropped from the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            self.path.write_bytes(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _rate(successes: int, episodes: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, episodes)
    return {"successes": successes, "episodes": episodes,
            "success_rate": successes / episodes if episodes else None, "ci95": [low, high]}


def summarize(rows: list[dict[str, Any]], tasks: dict[int, str]) -> dict[str, Any]:
    """Per-task and whole-suite success over the rows of the tasks in `tasks` ({task_id: language})."""
    per_task = []
    for task_id, language in tasks.items():
        outcomes = [bool(r["success"]) for r in rows if r["task_id"] == task_id]
        errors = sum(1 for r in rows if r["task_id"] == task_id and r.get("error"))
        per_task.append({"task_id": task_id, "task": language, **_rate(sum(outcomes), len(outcomes)),
                         "errors": errors})
    total = _rate(sum(t["successes"] for t in per_task), sum(t["episodes"] for t in per_task))
    return {"tasks": per_task, "suite": total}


def _percent(rate: dict[str, Any]) -> str:
    if not rate["episodes"]:
        return "-"
    low, high = rate["ci95"]
    return f"{100 * rate['success_rate']:.1f} ({100 * low:.1f}-{100 * high:.1f})"


def markdown_table(summary: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "| task | success % (95% CI) | successes / episodes |", "|---|---|---|"]
    for t in summary["tasks"]:
        lines.append(f"| {t['task_id']}: {t['task']} | {_percent(t)} | {t['successes']} / {t['episodes']} |")
    s = summary["suite"]
    lines.append(f"| **suite** | **{_percent(s)}** | {s['successes']} / {s['episodes']} |")
    return "\n".join(lines) + "\n"
