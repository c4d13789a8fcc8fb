"""Draw one PNG dashboard from one or more training runs, overlaid (e.g. plain fine-tuning vs CRaFT).

    python vla-scripts/plot_run.py runs/plain runs/craft --out dashboards/compare.png \
      [--labels "plain FT" CRaFT] [--projection_window 50] [--drift_scale log|linear]

Reads each run folder's metrics.jsonl and eval.jsonl; a field a run did not log is left out of
its panels (the panel says "not logged").
"""

import argparse
import sys
from pathlib import Path

from prismatic.training.dashboard import DashboardConfig, plot_runs


def parse_args(argv=None) -> argparse.Namespace:
    defaults = DashboardConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders holding metrics.jsonl / eval.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run folder (default: folder names)")
    parser.add_argument("--projection_window", type=int, default=defaults.projection_window,
                        help="steps in the rolling projection rate")
    parser.add_argument("--drift_scale", choices=("log", "linear"),
                        default="log" if defaults.drift_log_scale else "linear", help="y-axis of the drift panel")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = DashboardConfig(projection_window=args.projection_window, drift_log_scale=args.drift_scale == "log")
    try:
        plot_runs(args.run_dirs, args.out, labels=args.labels, cfg=cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"dashboard: {args.out}", flush=True)


if __name__ == "__main__":
    main()
