"""Does CRaFT keep a pretrained model's knowledge better than plain fine-tuning, at what cost to the new task, and
does its multiplier hold the drift budget? One command, CPU only, seeded:

    python experiments/forgetting/run.py --out runs/forgetting [--seeds 3] [--workers 2]

1. three synthetic LIBERO-schema datasets (assets.py): A (old tasks), B (new tasks), C (A's tasks, other actions);
2. a tiny OpenVLA pretrained from scratch on A, then its anchor cache from A (training and held-out anchors);
3. calibration: plain fine-tuning on B (its own seed), then a probe at learning rate 0 that reads the anchor
   drift D and the gradient ratio R from CRaFT's per-step log; arms.py turns them into the tuned settings;
4. every arm fine-tunes the pretrained checkpoint on B (and a subset on C) with the same data order and steps,
   per seed; the trainer's evaluations give B and A validation metrics and the held-out drift;
5. summary.md / summary.json (mean ± std over seeds) and one PNG per setting.
Re-running the command continues where it stopped (finished runs are kept; --settings / --arms may add runs);
a different configuration needs a new --out.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import draccus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arms import CONFLICT_ARMS, Calibration, arm_flags  # noqa: E402
from assets import CONFLICT, NEW, OLD, final_checkpoint, write_datasets, write_random_checkpoint  # noqa: E402
from runner import Run, train_run, train_runs  # noqa: E402
from summary import HELDOUT, VAL_ACC, VAL_L1, arm_numbers, markdown_table, read_jsonl, run_numbers  # noqa: E402

SETTINGS = {"new_tasks": NEW, "conflict": CONFLICT}  # fine-tuning data per setting


@dataclass
class ForgettingConfig:
    out: Path = Path("runs/forgetting")
    seeds: int = 3  # fine-tuning seeds 1..seeds (data order, anchor draws); data and pretraining use `seed`
    workers: int = 2  # fine-tuning runs side by side, one thread each
    settings: Tuple[str, ...] = ("new_tasks", "conflict")
    arms: Optional[Tuple[str, ...]] = None  # None: every arm (new_tasks) and arms.CONFLICT_ARMS (conflict)
    seed: int = 0
    # Data: tasks per dataset, episodes per task (one in 20 is in the validation split), frames per episode
    # (few frames: the marker that tells the step takes few positions, which the tiny model learns to read in
    # ~1000 steps; at 10 or 25 positions it had not after 500-800).
    num_tasks: int = 4
    episodes_per_task: int = 60
    steps_per_episode: int = 4
    image_size: int = 128
    batch_size: int = 8
    shuffle_buffer_size: int = 1000
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    finetune_steps: int = 150
    finetune_lr: float = 3e-4
    num_anchors: int = 64
    num_heldout_anchors: int = 32
    probe_steps: int = 8
    eval_interval: int = 25
    eval_batches: int = 4
    eval_train_anchors: int = 32  # the fixed subset of training anchors whose drift is also evaluated
    eval_shuffle_buffer_size: int = 256  # the validation splits are small (12 episodes of 4 frames by default)
    warmup_fraction: float = 0.2  # evaluations before this share of the steps do not count against epsilon

    def validate(self) -> None:
        unknown = set(self.settings) - set(SETTINGS)
        if unknown:
            raise ValueError(f"--settings must be among {sorted(SETTINGS)}; found {sorted(unknown)}")
        for flag in ("seeds", "workers", "pretrain_steps", "finetune_steps", "probe_steps", "eval_interval"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1; found {getattr(self, flag)}")


def _trainer_flags(cfg: ForgettingConfig, checkpoint: Path, data_mix: str, lr: float, seed: int) -> tuple:
    """What every trainer run here shares: CPU, float32 (faster than bf16 autocast on this CPU for the tiny
    model), no activation recomputation, a small shuffle buffer."""
    return ("--pretrained_checkpoint", checkpoint, "--data_root_dir", cfg.out / "data", "--vla.data_mix", data_mix,
            "--vla.learning_rate", lr, "--vla.per_device_batch_size", cfg.batch_size,
            "--vla.shuffle_buffer_size", cfg.shuffle_buffer_size, "--vla.enable_mixed_precision_training", "false",
            "--vla.enable_gradient_checkpointing", "false", "--device", "cpu", "--seed", seed,
            "--craft.anchor_seed", seed, "--eval.batches", cfg.eval_batches,
            "--eval.shuffle_buffer_size", cfg.eval_shuffle_buffer_size)


def _finetune_flags(cfg: ForgettingConfig, checkpoint: Path, data_mix: str, seed: int, lr: Optional[float] = None
                    ) -> tuple:
    """Fine-tuning with the anchor cache given (plain fine-tuning too, for its drift) and A as the retention mix."""
    cache = cfg.out / "anchor_cache"
    lr = cfg.finetune_lr if lr is None else lr
    return (*_trainer_flags(cfg, checkpoint, data_mix, lr, seed), "--craft.anchor_cache_dir", cache,
            "--eval.interval", cfg.eval_interval, "--eval.retention_mix", OLD,
            "--eval.train_anchor_subset", cfg.eval_train_anchors)


def prepare(cfg: ForgettingConfig) -> Path:
    """Data, pretraining on A and the anchor cache; returns the pretrained checkpoint. Finished parts are kept."""
    data = cfg.out / "data"
    if not (data / CONFLICT).exists():
        for name in (OLD, NEW, CONFLICT):  # a partial earlier attempt
            if (data / name).exists():
                raise FileExistsError(f"{data / name} exists from an interrupted run; remove {data} and rerun")
        write_datasets(data, cfg.num_tasks, cfg.episodes_per_task, cfg.steps_per_episode, cfg.image_size, cfg.seed)
    random = cfg.out / "random_init"
    if not (random / "config.json").exists():
        write_random_checkpoint(random, cfg.seed)
    pretrain = Run(cfg.out / "runs", "pretrain_A", cfg.pretrain_steps,
                   (*_trainer_flags(cfg, random, OLD, cfg.pretrain_lr, cfg.seed), "--craft.enabled", "false",
                    "--eval.interval", "0"))
    train_run(pretrain)
    pretrained = final_checkpoint(pretrain.run_dir)
    cache = cfg.out / "anchor_cache"
    if not (cache / "meta.json").exists():
        from prismatic.training.anchor_builder import AnchorCacheConfig, build_anchor_cache

        cache_cfg = draccus.parse(AnchorCacheConfig, args=[
            "--pretrained_checkpoint", str(pretrained), "--data_root_dir", str(data), "--data_mix", OLD,
            "--output_dir", str(cache), "--num_anchors", str(cfg.num_anchors),
            "--num_heldout_anchors", str(cfg.num_heldout_anchors), "--dtype", "float32", "--device", "cpu",
            "--shuffle_buffer_size", str(cfg.shuffle_buffer_size), "--seed", str(cfg.seed), "--overwrite", "true"])
        cache_cfg.validate()
        build_anchor_cache(cache_cfg)
    return pretrained


def calibrate(cfg: ForgettingConfig, pretrained: Path) -> Calibration:
    """Plain fine-tuning on B with a seed of its own (not one of the reported seeds): D is its final held-out drift
    (all held-out anchors, the quantity the table holds against epsilon). Then a probe from its end, CRaFT steps
    at learning rate 0 and lambda 0, whose log gives the two gradients' norms."""
    seed = cfg.seed + 100
    plain = Run(cfg.out / "runs", "calibration_plain_B", cfg.finetune_steps,
                (*_finetune_flags(cfg, pretrained, NEW, seed), "--craft.enabled", "false"))
    train_run(plain)
    drift = read_jsonl(plain.run_dir / "eval.jsonl")[-1][HELDOUT]
    probe = Run(cfg.out / "runs", "calibration_probe", cfg.probe_steps,
                (*_finetune_flags(cfg, final_checkpoint(plain.run_dir), NEW, seed, lr=0.0), "--craft.lambda_init", "0",
                 "--craft.lambda_lr", "0"))
    train_run(probe)
    return Calibration(drift=drift, grad_ratio=gradient_ratio(read_jsonl(probe.run_dir / "metrics.jsonl")))


def gradient_ratio(rows) -> float:
    """|g_act| / |g_ret|, median over steps logged with lambda = 0. The combined gradient is then g_act, projected
    off g_ret when <g_act, g_ret> < 0, so its norm is |g_act| sqrt(1 - cos^2) there; |g_ret| = <g_act, g_ret> /
    (cos |g_act|)."""
    import numpy as np

    ratios = []
    for r in rows:
        act = r["grad_norm"] / np.sqrt(1 - r["grad_cos"] ** 2) if r["projection"] else r["grad_norm"]
        ratios.append(act / (r["grad_dot"] / (r["grad_cos"] * act)))
    return float(np.median(ratios))


def arm_runs(cfg: ForgettingConfig, pretrained: Path, cal: Calibration) -> dict:
    """{(setting, arm): [Run per seed]}."""
    flags = arm_flags(cal)
    chosen = cfg.arms or tuple(flags)
    unknown = set(chosen) - set(flags)
    if unknown:
        raise ValueError(f"--arms must be among {sorted(flags)}; found {sorted(unknown)}")
    runs = {}
    for setting in cfg.settings:
        arms = chosen if setting == "new_tasks" else [a for a in chosen if a in CONFLICT_ARMS]
        for arm in arms:
            runs[setting, arm] = [
                Run(cfg.out / "runs", f"{setting}-{arm}-s{seed}", cfg.finetune_steps,
                    (*_finetune_flags(cfg, pretrained, SETTINGS[setting], seed), *flags[arm]))
                for seed in range(1, cfg.seeds + 1)]
    return runs


def summarize(cfg: ForgettingConfig, cal: Calibration, runs: dict, pretrained: Path) -> dict:
    from plots import plot_setting

    warmup = int(cfg.warmup_fraction * cfg.finetune_steps)
    pre_rows = read_jsonl(pretrained.parent.parent / "eval.jsonl")
    summary = {"calibration": {**asdict(cal), "epsilon": cal.epsilon}, "pretrained_on_A": pre_rows[-1],
               "settings": {}}
    pre = pre_rows[-1]
    lines = [f"Pretrained on A ({cfg.pretrain_steps} steps), A validation: action accuracy "
             f"{pre.get(VAL_ACC, float('nan')):.3f}, L1 {pre.get(VAL_L1, float('nan')):.3f}",
             f"Calibration: D = {cal.drift:.4g}, R = {cal.grad_ratio:.4g}, tuned epsilon = {cal.epsilon:.4g}", ""]
    for setting in cfg.settings:
        mine = {arm: rs for (s, arm), rs in runs.items() if s == setting}
        per_seed = {arm: {i + 1: run_numbers(r.run_dir, warmup) for i, r in enumerate(rs)} for arm, rs in mine.items()}
        table = arm_numbers(per_seed)
        summary["settings"][setting] = {"per_seed": per_seed, "per_arm": table}
        png = plot_setting({arm: [r.run_dir for r in rs] for arm, rs in mine.items()}, cal.epsilon,
                           f"{setting}: fine-tuning on {SETTINGS[setting]}, A = {OLD}", cfg.out / f"{setting}.png")
        lines += [f"## {setting} ({SETTINGS[setting]}): mean ± std over seeds 1..{cfg.seeds}", "",
                  markdown_table(table), "", f"![{setting}]({png.name})", ""]
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (cfg.out / "summary.md").write_text("\n".join(lines))
    return summary


def _results_config(cfg: ForgettingConfig) -> dict:
    """The settings every finished run in --out depends on; --workers, --settings and --arms only choose which
    runs happen (a rerun may add a setting or an arm to the same folder)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "settings", "arms")}


def main(cfg: ForgettingConfig) -> dict:
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    recorded, fixed = cfg.out / "config.json", json.dumps(_results_config(cfg), indent=2, default=str)
    if recorded.exists() and recorded.read_text() != fixed:
        raise ValueError(f"{cfg.out} holds a run with another configuration ({recorded}); choose another --out")
    recorded.write_text(fixed)
    pretrained = prepare(cfg)
    cal = calibrate(cfg, pretrained)
    (cfg.out / "calibration.json").write_text(json.dumps({**asdict(cal), "epsilon": cal.epsilon}, indent=2))
    runs = arm_runs(cfg, pretrained, cal)
    train_runs([r for rs in runs.values() for r in rs], cfg.workers)
    return summarize(cfg, cal, runs, pretrained)


if __name__ == "__main__":
    main(draccus.parse(ForgettingConfig))
