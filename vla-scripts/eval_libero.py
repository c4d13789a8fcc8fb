"""Success rates of a checkpoint in the LIBERO simulator, by OpenVLA's evaluation protocol.

    python vla-scripts/eval_libero.py --checkpoint runs/<run_id>/checkpoints/step-050000 \
      --task_suite libero_spatial --num_trials_per_task 50 --num_envs 8 [--center_crop true]

Writes <output_dir>/episodes.jsonl (one row per episode; rerun the same command to resume), results.json and
results.md (per-task and suite success with 95% Wilson intervals) and, with --video_episodes '[0,1]', GIFs.
Needs the optional simulator install (`make libero`).
"""

import sys

import draccus

from prismatic.sim.evaluate import LiberoEvalConfig, evaluate
from prismatic.sim.libero_env import LiberoUnavailable


@draccus.wrap()
def main(cfg: LiberoEvalConfig) -> None:
    try:
        summary = evaluate(cfg)
    except (ValueError, FileNotFoundError, LiberoUnavailable) as e:
        print(f"eval_libero.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    suite = summary["suite"]
    print(f"{cfg.task_suite}: {suite['successes']}/{suite['episodes']} successes; results in {cfg.output_dir}")


if __name__ == "__main__":
    main()
