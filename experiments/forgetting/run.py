"""What does each way of fine-tuning trade between learning new tasks and keeping old ones? One command, CPU only,
seeded, resumable:

    python experiments/forgetting/run.py --out runs/frontier --export experiments/forgetting/frontier_logs

1. four synthetic LIBERO-schema datasets (assets.py): A (old tasks), B (new tasks), C (A's tasks, other actions),
   SHIFTED (B, validated in A's scenes);
2. per pretraining seed: a tiny OpenVLA pretrained from scratch on A, and one anchor cache from A per retention
   signal (arms.SIGNALS);
3. calibration per pretrained model and learning rate (arms.py says what it measures and which rules turn it
   into every knob value);
4. fine-tuning from the pretrained checkpoint, per method and knob value, on fine-tuning seeds 1..seeds, in the
   order that makes a partial run useful: new_tasks (all knobs, seed by seed), fast (the learning rate
   arms.fast_multiple picks), conflict and shifted (each method at the knob arms.pick chooses from new_tasks), then
   the other pretraining seeds (new_tasks at the picked knobs);
5. summary.md / summary.json (mean and 95 % t-interval over seeds) and `frontier_<setting>.png`.
Re-running the command continues where it stopped. With --export, each finished fine-tuning run's logs are copied
to <export>/<run_id>/ with the pretrained weights' checksums and the calibrations: on a fresh machine the same
command regenerates data, pretraining, caches and calibration, refuses if they differ from the recorded ones, and
runs only what the export folder does not hold. A different configuration needs a new --out and --export.
"""

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import draccus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arms import METHODS, SIGNALS, Calibration, fast_multiple, pick  # noqa: E402
from assets import (CONFLICT, NEW, OLD, SHIFTED, final_checkpoint, weight_distance, weights_sha256,  # noqa: E402
                    write_datasets, write_random_checkpoint)
from runner import Run, one_thread, train_run, train_runs  # noqa: E402
from summary import HELDOUT, group_numbers, markdown_table, read_jsonl, run_numbers  # noqa: E402

# setting: (run-id key, fine-tuning data); new_tasks and fast differ in learning rate only
SETTINGS = {"new_tasks": ("B", NEW), "fast": ("B", NEW), "conflict": ("C", CONFLICT), "shifted": ("S", SHIFTED)}
CALIBRATION_SEED = 100  # + pretraining seed: not one of the reported fine-tuning seeds


@dataclass
class ForgettingConfig:
    out: Path = Path("runs/frontier")
    export: Optional[Path] = None  # finished fine-tuning runs' logs go to <export>/<run_id>/ and are found there
    seeds: int = 3  # fine-tuning seeds 1..seeds (data order, anchor draws)
    workers: int = 2  # fine-tuning runs side by side, one thread each
    settings: Tuple[str, ...] = ("new_tasks", "fast", "conflict", "shifted")
    methods: Optional[Tuple[str, ...]] = None  # None: every method of arms.METHODS
    knobs: Optional[Tuple[int, ...]] = None  # indices into each method's knob values (None: all), for a pilot
    data_seed: int = 0
    # The first gets every run; the others new_tasks at the picked knobs (the headline rows).
    pretrain_seeds: Tuple[int, ...] = (0, 5)
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
    eval_interval: int = 50
    eval_batches: int = 4
    eval_train_anchors: int = 32  # the fixed subset of training anchors whose drift is also evaluated
    eval_shuffle_buffer_size: int = 256  # the validation splits are small (12 episodes of 4 frames by default)

    def validate(self) -> None:
        for flag, chosen, known in (("settings", self.settings, SETTINGS), ("methods", self.methods or (), METHODS)):
            if set(chosen) - set(known):
                raise ValueError(f"--{flag} must be among {sorted(known)}; found {sorted(set(chosen) - set(known))}")
        if self.needs_picks and not ("new_tasks" in self.settings and 1.0 in self.knob_values("plain")):
            raise ValueError("fast, conflict, shifted and further pretraining seeds take their knobs from the "
                             "new_tasks frontier and plain's numbers there: they need new_tasks among --settings, "
                             "plain among --methods and plain's default learning rate among --knobs")
        if "fast" in self.settings and self.knobs is not None:
            raise ValueError("fast picks its learning rate from plain's whole new_tasks grid: it needs --knobs null")
        for flag in ("seeds", "workers", "pretrain_steps", "finetune_steps", "probe_steps", "eval_interval"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be >= 1; found {getattr(self, flag)}")
        if not self.pretrain_seeds or len(set(self.pretrain_seeds)) != len(self.pretrain_seeds):
            raise ValueError(f"--pretrain_seeds must be distinct and not empty; found {self.pretrain_seeds}")

    @property
    def needs_picks(self) -> bool:
        return bool(set(self.settings) - {"new_tasks"}) or len(self.pretrain_seeds) > 1

    @property
    def chosen_methods(self) -> Tuple[str, ...]:
        return self.methods or tuple(METHODS)

    def knob_values(self, method: str, setting: str = "new_tasks") -> Tuple[float, ...]:
        if method not in self.chosen_methods:
            return ()
        m = METHODS[method]
        if self.knobs is not None:
            return tuple(m.values[i] for i in self.knobs if i < len(m.values))
        return (*m.values, *m.new_tasks_only) if setting == "new_tasks" else m.values


@dataclass(frozen=True)
class Model:
    """One pretrained model and its anchor caches, one per retention signal."""

    seed: int
    checkpoint: Path
    caches: Dict[str, Path]


def _trainer_flags(cfg: ForgettingConfig, checkpoint: Path, data_mix: str, lr: float, seed: int) -> tuple:
    """What every trainer run here shares: CPU, float32 (faster than bf16 autocast on this CPU for the tiny
    model), no activation recomputation, a small shuffle buffer."""
    return ("--pretrained_checkpoint", checkpoint, "--data_root_dir", cfg.out / "data", "--vla.data_mix", data_mix,
            "--vla.learning_rate", f"{lr:.3g}", "--vla.per_device_batch_size", cfg.batch_size,
            "--vla.shuffle_buffer_size", cfg.shuffle_buffer_size, "--vla.enable_mixed_precision_training", "false",
            "--vla.enable_gradient_checkpointing", "false", "--device", "cpu", "--seed", seed,
            "--craft.anchor_seed", seed, "--eval.batches", cfg.eval_batches,
            "--eval.shuffle_buffer_size", cfg.eval_shuffle_buffer_size)


def _finetune_flags(cfg: ForgettingConfig, checkpoint: Path, cache: Path, data_mix: str, lr: float, seed: int
                    ) -> tuple:
    """Fine-tuning with an anchor cache given (for the drift evaluation, CRaFT's signal, replay's frames) and A as
    the retention mix."""
    return (*_trainer_flags(cfg, checkpoint, data_mix, lr, seed), "--craft.anchor_cache_dir", cache,
            "--eval.interval", cfg.eval_interval, "--eval.retention_mix", OLD,
            "--eval.train_anchor_subset", cfg.eval_train_anchors)


def prepare_data(cfg: ForgettingConfig) -> None:
    data = cfg.out / "data"
    if (data / SHIFTED).exists():
        return
    for name in (OLD, NEW, CONFLICT):  # a partial earlier attempt
        if (data / name).exists():
            raise FileExistsError(f"{data / name} exists from an interrupted run; remove {data} and rerun")
    write_datasets(data, cfg.num_tasks, cfg.episodes_per_task, cfg.steps_per_episode, cfg.image_size, cfg.data_seed)


def pretrain(cfg: ForgettingConfig, seed: int) -> Path:
    """Pretraining on A from a random model, both seeded by `seed`; returns the final checkpoint, once its weights
    are checked against the recorded ones."""
    home = cfg.out / f"p{seed}"
    if not (home / "random_init" / "config.json").exists():
        write_random_checkpoint(home / "random_init", seed)
    run = Run(cfg.out / "runs", f"pretrain-p{seed}", cfg.pretrain_steps,
              (*_trainer_flags(cfg, home / "random_init", OLD, cfg.pretrain_lr, seed), "--craft.enabled", "false",
               "--eval.interval", "0"), keep_checkpoint=True)
    train_run(run)
    checkpoint = final_checkpoint(run.run_dir)
    _check_fingerprint(cfg, f"p{seed}", "pretrained_sha256", weights_sha256(checkpoint))
    return checkpoint


def prepare_model(cfg: ForgettingConfig, seed: int) -> Model:
    """The pretrained model and its anchor caches; finished parts are kept. The caches take their anchors with the
    data seed: the same frames for every pretrained model."""
    checkpoint = pretrain(cfg, seed)
    caches = {name: cfg.out / f"p{seed}" / f"cache_{name}" for name in SIGNALS}
    for name, cache in caches.items():
        if (cache / "meta.json").exists():
            continue
        from prismatic.training.anchor_builder import AnchorCacheConfig, build_anchor_cache

        cache_cfg = draccus.parse(AnchorCacheConfig, args=[
            "--pretrained_checkpoint", str(checkpoint), "--data_root_dir", str(cfg.out / "data"), "--data_mix", OLD,
            "--output_dir", str(cache), "--num_anchors", str(cfg.num_anchors),
            "--num_heldout_anchors", str(cfg.num_heldout_anchors), "--dtype", "float32", "--device", "cpu",
            "--shuffle_buffer_size", str(cfg.shuffle_buffer_size), "--seed", str(cfg.data_seed), "--overwrite", "true",
            *SIGNALS[name].cache_flags])
        cache_cfg.validate()
        build_anchor_cache(cache_cfg)
    return Model(seed, checkpoint, caches)


def calibrate(cfg: ForgettingConfig, model: Model, lr: float) -> Calibration:
    """Plain fine-tuning on B at `lr` with a seed of its own; then, per signal, a probe from its end: CRaFT steps at
    learning rate 0 and lambda 0 whose first evaluation is plain's final drift D_s on that signal's cache and whose
    log gives |g_act| and |g_ret|. W is plain's weight distance from the pretrained model."""
    seed, tag = CALIBRATION_SEED + model.seed, f"p{model.seed}-lr{lr:.3g}"
    plain = Run(cfg.out / "runs", f"cal-{tag}-plain", cfg.finetune_steps,
                (*_finetune_flags(cfg, model.checkpoint, model.caches["guide"], NEW, lr, seed), "--craft.enabled",
                 "false"), keep_checkpoint=True)
    train_run(plain)
    end = final_checkpoint(plain.run_dir)
    probes = {name: Run(cfg.out / "runs", f"cal-{tag}-probe-{name}", cfg.probe_steps,
                        (*_finetune_flags(cfg, end, model.caches[name], NEW, 0.0, seed), *SIGNALS[name].craft_flags,
                         "--craft.lambda_init", "0", "--craft.lambda_lr", "0"))
              for name in SIGNALS}
    for probe in probes.values():
        train_run(probe)
    norms = {name: gradient_norms(read_jsonl(p.run_dir / "metrics.jsonl")) for name, p in probes.items()}
    cal = Calibration(lr=float(f"{lr:.3g}"),
                      drift={name: read_jsonl(p.run_dir / "eval.jsonl")[0][HELDOUT] for name, p in probes.items()},
                      grad_ratio={name: act / ret for name, (act, ret) in norms.items()},
                      grad_act=norms["guide"][0], weight_distance=weight_distance(model.checkpoint, end))
    _check_fingerprint(cfg, f"p{model.seed}", f"calibration_lr{lr:.3g}", asdict(cal))
    return cal


def gradient_norms(rows) -> Tuple[float, float]:
    """(|g_act|, |g_ret|), medians over steps logged with lambda = 0. The combined gradient is then g_act, projected
    off g_ret when <g_act, g_ret> < 0, so its norm is |g_act| sqrt(1 - cos^2) there; |g_ret| = <g_act, g_ret> /
    (cos |g_act|)."""
    import numpy as np

    act = [r["grad_norm"] / np.sqrt(1 - r["grad_cos"] ** 2) if r["projection"] else r["grad_norm"] for r in rows]
    ret = [r["grad_dot"] / (r["grad_cos"] * a) for r, a in zip(rows, act)]
    return float(np.median(act)), float(np.median(ret))


def _check_fingerprint(cfg: ForgettingConfig, model: str, key: str, value) -> None:
    """Record what a regenerated input must equal (pretrained weights, calibration numbers), in --out and --export;
    refuse when a recorded value differs: runs made from another model would not be comparable."""
    for folder in (cfg.out, cfg.export):
        if folder is None:
            continue
        path = folder / "fingerprints.json"
        recorded = json.loads(path.read_text()) if path.exists() else {}
        known = recorded.setdefault(model, {}).get(key)
        if known is not None and known != value:
            raise RuntimeError(
                f"{model} {key} regenerated here is {value}, but {path} records {known}: this machine does not "
                f"reproduce the recorded pretraining or calibration, so its runs would not be comparable with the "
                f"recorded ones. Continue on a machine that reproduces them, or start a new --out and --export.")
        recorded[model][key] = value
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, indent=2, sort_keys=True))


def method_run(cfg: ForgettingConfig, model: Model, cal: Calibration, setting: str, method: str, value: float,
               seed: int) -> Run:
    key, data = SETTINGS[setting]
    m = METHODS[method]
    lr = m.learning_rate(cal, value)
    knob = "" if m.knob == "lr" else f"-{m.knob}{value:g}"
    return Run(cfg.out / "runs", f"{key}-{method}-lr{lr:.3g}{knob}-p{model.seed}-s{seed}", cfg.finetune_steps,
               (*_finetune_flags(cfg, model.checkpoint, model.caches[m.signal], data, lr, seed), *m.flags(cal, value)),
               export=cfg.export)


Cells = Dict[Tuple[str, float], List[Run]]  # (method, knob value) -> runs, one per fine-tuning seed


def run_cells(cfg: ForgettingConfig, model: Model, cal: Calibration, setting: str, knobs: Dict[str, tuple]) -> Cells:
    """Every (method, knob value) of `knobs` on every fine-tuning seed, run seed by seed."""
    cells = {(method, v): [method_run(cfg, model, cal, setting, method, v, s) for s in range(1, cfg.seeds + 1)]
             for method, values in knobs.items() for v in values}
    train_runs([runs[i] for i in range(cfg.seeds) for runs in cells.values()], cfg.workers)
    return cells


def frontier(cells: Cells) -> Dict[Tuple[str, float], Dict[str, list]]:
    return group_numbers({cell: [run_numbers(r.run_dir) for r in runs] for cell, runs in cells.items()})


def main(cfg: ForgettingConfig) -> dict:
    cfg.validate()
    with one_thread():  # pretraining, caches and calibration are then the same on any machine of this CPU type
        return _main(cfg)


def _main(cfg: ForgettingConfig) -> dict:
    for folder in (cfg.out, cfg.export):
        if folder is not None:
            _record_config(cfg, folder)
    prepare_data(cfg)
    first, *others = cfg.pretrain_seeds
    model = prepare_model(cfg, first)
    base = calibrate(cfg, model, cfg.finetune_lr)
    sweep = {m: cfg.knob_values(m) for m in cfg.chosen_methods}
    learning_rates = {"new_tasks": base.lr, "conflict": base.lr, "shifted": base.lr}
    results: Dict[Tuple[str, int], Cells] = {}  # (setting, pretraining seed) -> cells
    report = {"calibration": {f"p{first}-lr{base.lr:.3g}": asdict(base)}}
    if "new_tasks" in cfg.settings:
        results["new_tasks", first] = run_cells(cfg, model, base, "new_tasks", sweep)
    if cfg.needs_picks:
        numbers = frontier(results["new_tasks", first])
        report["picks"] = picks = {m: pick({v: numbers[m, v] for v in sweep[m]}, numbers["plain", 1.0])
                                   for m in cfg.chosen_methods}
        if "fast" in cfg.settings:
            report["fast_multiple"] = multiple = fast_multiple(
                {v: numbers["plain", v]["old_increase"] for v in sweep["plain"]})
            fast = calibrate(cfg, model, cfg.finetune_lr * multiple)
            report["calibration"][f"p{first}-lr{fast.lr:.3g}"] = asdict(fast)
            learning_rates["fast"] = fast.lr
            results["fast", first] = run_cells(cfg, model, fast, "fast", {m: cfg.knob_values(m, "fast") for m in sweep})
        for setting in ("conflict", "shifted"):
            if setting in cfg.settings:
                results[setting, first] = run_cells(cfg, model, base, setting, {m: (v,) for m, v in picks.items()})
        for seed in others:
            other = prepare_model(cfg, seed)
            cal = calibrate(cfg, other, cfg.finetune_lr)
            report["calibration"][f"p{seed}-lr{cal.lr:.3g}"] = asdict(cal)
            results["new_tasks", seed] = run_cells(cfg, other, cal, "new_tasks", {m: (v,) for m, v in picks.items()})
    report["learning_rate"] = learning_rates
    return summarize(cfg, results, report, model)


def summarize(cfg: ForgettingConfig, results: Dict[Tuple[str, int], Cells], report: dict, model: Model) -> dict:
    """Tables and plots of every setting run; knob values of lr are multiples of the setting's learning rate."""
    from plots import plot_frontier

    pre = read_jsonl(model.checkpoint.parent.parent / "eval.jsonl")[-1]
    report.update(pretrained_on_A=pre, settings={})
    lines = [f"Pretrained on A (seed {model.seed}, {cfg.pretrain_steps} steps): A validation L1 "
             f"{pre.get('eval/val_l1', float('nan')):.3f}", "", "Calibration (arms.py), per pretrained model and "
             "learning rate: D = plain's final held-out drift per signal, R = |g_act| / |g_ret| per signal, "
             "G = |g_act|, W = plain's weight distance", ""]
    lines += [f"- {key}: D = {_rounded(c['drift'])}, R = {_rounded(c['grad_ratio'])}, G = {c['grad_act']:.4g}, "
              f"W = {c['weight_distance']:.4g}" for key, c in report["calibration"].items()]
    lines += ["", "Knobs: lr = multiple of the setting's learning rate; m = penalty strength (lambda = m R, "
              "a = m G / W); k = replayed frames; f = nuPI's budget, epsilon = f D; lambda = lambda itself.", ""]
    for key in ("fast_multiple", "picks"):
        if key in report:
            lines += [f"{key}: {json.dumps(report[key])}", ""]
    headline: Dict[str, List[dict]] = {}  # new_tasks at the picked knobs, runs of every pretraining seed
    for (setting, seed), cells in results.items():
        name = setting if seed == model.seed else f"{setting}, pretraining seed {seed}"
        runs = {cell: [run_numbers(r.run_dir) for r in rs] for cell, rs in cells.items()}
        grouped = group_numbers(runs)
        rows = {f"{m} {_knob(m, v)}": n for (m, v), n in grouped.items()}
        report["settings"][name] = {"rows": rows, "runs": {r.run_id: n for cell, rs in cells.items()
                                                           for r, n in zip(rs, runs[cell])}}
        lines += [f"## {name} (learning rate {report['learning_rate'][setting]:.3g}): mean ± 95 % t half-width "
                  "over fine-tuning seeds", "", markdown_table(rows), ""]
        if setting == "new_tasks" and "picks" in report:
            for m, v in report["picks"].items():
                headline.setdefault(f"{m} {_knob(m, v)}", []).extend(runs[m, v])
        if seed == model.seed:
            curves = {}
            for (m, v), n in grouped.items():
                curves.setdefault(m, []).append((_knob(m, v), n))
            png = plot_frontier(curves, f"{name}: fine-tuning on {SETTINGS[setting][1]}, A = {OLD}",
                                cfg.out / f"frontier_{name}.png")
            lines += [f"![{name}]({png.name})", ""]
    if len({seed for _, seed in results}) > 1:
        report["headline"] = rows = group_numbers(headline)
        lines += ["## Headline: new_tasks at the picked knobs, the runs of every pretraining seed together", "",
                  markdown_table(rows), ""]
    (cfg.out / "summary.json").write_text(json.dumps(report, indent=2))
    (cfg.out / "summary.md").write_text("\n".join(lines))
    return report


def _knob(method: str, value: float) -> str:
    return f"{METHODS[method].knob}={value:g}"


def _rounded(values: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


SELECTORS = ("out", "export", "workers", "settings", "methods", "knobs", "seeds", "pretrain_seeds")


def _record_config(cfg: ForgettingConfig, folder: Path) -> None:
    """The settings every finished run depends on; SELECTORS only choose where and which runs happen (a rerun may
    add runs to the same folders; the picks are recomputed from what new_tasks then holds)."""
    fixed = json.dumps({k: v for k, v in asdict(cfg).items() if k not in SELECTORS}, indent=2, default=str)
    recorded = folder / "config.json"
    if recorded.exists() and recorded.read_text() != fixed:
        raise ValueError(f"{folder} holds runs of another configuration ({recorded}); choose another --out/--export")
    folder.mkdir(parents=True, exist_ok=True)
    recorded.write_text(fixed)


if __name__ == "__main__":
    main(draccus.parse(ForgettingConfig))
