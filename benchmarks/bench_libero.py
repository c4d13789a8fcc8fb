"""Seconds per LIBERO episode with 1 vs N simulator workers feeding one batched policy (the 7B-shaped model).

    python benchmarks/bench_libero.py --preset openvla-7b --device cuda --num_envs 1 8 --out OUT.json
    python benchmarks/bench_libero.py --preset tiny --device cpu --num_envs 1 2 --episodes_per_env 1 --max_steps 5

Random weights (nothing to download) and a config-only checkpoint folder carrying action statistics; each setting
plays `episodes_per_env x N` episodes of one libero_spatial task in a fresh output folder, so environment start-up
is part of the cost, as in a real evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import DTYPES, build_model  # noqa: E402
from common import base_record, run_cli  # noqa: E402

from prismatic.models import PRESETS, build_tiny_tokenizer, preset_config  # noqa: E402
from prismatic.sim.evaluate import LiberoEvalConfig, LiberoPolicy, evaluate  # noqa: E402

UNNORM_KEY = "libero_spatial_no_noops"
STATS = {UNNORM_KEY: {"action": {"q01": [-0.9] * 3 + [-0.1] * 3 + [0.0], "q99": [0.9] * 3 + [0.1] * 3 + [1.0],
                                 "mask": [True] * 6 + [False]}}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="openvla-7b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--num_envs", type=int, nargs="+", default=[1, 8])
    p.add_argument("--episodes_per_env", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=None, help="policy steps per episode (default: the suite's 220)")
    p.add_argument("--task_id", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run(args) -> dict:
    import torch

    model = build_model(args.preset, torch.device(args.device), DTYPES[args.dtype], args.seed).eval()
    model.config.norm_stats = STATS
    policy = LiberoPolicy(model, build_tiny_tokenizer(), UNNORM_KEY, center_crop=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / args.preset
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps({**preset_config(args.preset).to_dict(), "norm_stats": STATS}))
        for n in args.num_envs:
            episodes = n * args.episodes_per_env
            cfg = LiberoEvalConfig(checkpoint=ckpt, task_suite="libero_spatial", task_ids=[args.task_id],
                                   num_trials_per_task=episodes, num_envs=n, max_steps=args.max_steps,
                                   output_dir=Path(tmp) / f"envs{n}", dtype=args.dtype, seed=args.seed)
            start = time.perf_counter()
            summary = evaluate(cfg, policy)
            seconds = time.perf_counter() - start
            rows = [json.loads(line) for line in (Path(tmp) / f"envs{n}" / "episodes.jsonl").read_text().splitlines()]
            runs.append({"num_envs": n, "episodes": episodes, "seconds": seconds, "s_per_episode": seconds / episodes,
                         "policy_steps": sum(r["steps"] for r in rows), "errors": summary["tasks"][0]["errors"]})
            print(f"num_envs={n}: {episodes} episodes in {seconds:.1f} s ({seconds / episodes:.1f} s/episode)",
                  flush=True)
    return base_record(benchmark="libero_episodes", preset=args.preset, device=args.device, dtype=args.dtype,
                       max_steps=cfg.max_steps, task_suite="libero_spatial", task_id=args.task_id, runs=runs)


def summary(record: dict) -> str:
    parts = [f"{r['num_envs']} env(s) {r['s_per_episode']:.1f} s/episode" for r in record["runs"]]
    return f"LIBERO {record['preset']} on {record['device']}: " + ", ".join(parts)


if __name__ == "__main__":
    run_cli(parse_args, run, summary)
