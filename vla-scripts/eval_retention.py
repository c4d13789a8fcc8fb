"""Retention metrics of finished checkpoints: drift on the anchor cache's held-out and training anchors, action
metrics on validation data. Writes OUT/retention.json and OUT/retention.md.

    python vla-scripts/eval_retention.py --checkpoints /ckpt/openvla-7b runs/<run_id>/checkpoints \
      --anchor_cache_dir /data/craft/hidden_cache --output_dir out/retention \
      --data_root_dir /data/rlds --data_mix libero_90 [--retention_mix libero_spatial_no_noops]

A folder holding `step-*` checkpoints (a run's `checkpoints/`) stands for all of them. List the checkpoint the
cache was built from to get the before-fine-tuning row: its drift must come out ~0 (a warning says otherwise).
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List

import numpy as np
import torch

import prismatic.models  # noqa: F401  (torchvision guard before timm)
from craft.anchor_cache import AnchorCache
from craft.config import RETENTION_LOSS_TYPES
from craft.retention import cache_signal
from prismatic.conf.eval import RetentionEvalConfig
from prismatic.models import ImageProcessor, load_pretrained
from prismatic.models.checkpoint import read_config
from prismatic.training.checkpointing import ADAPTER_FILE
from prismatic.training.evaluation import Evaluator, anchor_sets, validation_frames
from prismatic.training.preflight import resolve_device
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator
from prismatic.vla.datasets import check_data_root, resolve_mixture

# The cache's own model must reproduce its targets: drift above this share of the targets' mean square (mse)
# or this 1 - cosine is more than the rounding of a bf16 cache evaluated in another precision or batch layout.
SOURCE_DRIFT_TOLERANCE = 1e-3


def parse_args(argv=None) -> RetentionEvalConfig:
    d = RetentionEvalConfig()
    p = argparse.ArgumentParser(prog="eval_retention.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", type=Path, required=True)
    p.add_argument("--anchor_cache_dir", type=Path, required=True)
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--data_root_dir", type=Path, default=d.data_root_dir)
    p.add_argument("--data_mix", default=d.data_mix)
    p.add_argument("--retention_mix", default=d.retention_mix)
    p.add_argument("--eval_batches", type=int, default=d.eval_batches)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--train_anchor_subset", type=int, default=d.train_anchor_subset)
    p.add_argument("--shuffle_buffer_size", type=int, default=d.shuffle_buffer_size)
    p.add_argument("--retention_loss_type", default=d.retention_loss_type, choices=RETENTION_LOSS_TYPES,
                   help="for a hidden-state cache: mse (default), nmse or cosine; an action cache measures kl")
    p.add_argument("--epsilon", type=float, default=d.epsilon)
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=d.seed)
    return RetentionEvalConfig(**vars(p.parse_args(argv)))


def expand_checkpoints(paths: List[Path]) -> List[Path]:
    """Checkpoint folders, a folder of `step-*` checkpoints replaced by them in step order."""
    out = []
    for path in paths:
        steps = sorted(p for p in path.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))
        if (path / "config.json").is_file() or not steps:
            out.append(path)
        else:
            out.extend(steps)
    for path in out:
        if (path / ADAPTER_FILE).is_file() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoints {path} holds LoRA adapters only (saved with --vla.merge_on_save "
                                    "false): there is no merged model to evaluate; save with merging on")
        read_config(path)  # the folder exists and holds config.json
    return out


def validate(cfg: RetentionEvalConfig) -> List[Path]:
    """Everything that can be wrong, before any model or data is loaded; returns the checkpoints to evaluate."""
    checkpoints = expand_checkpoints(cfg.checkpoints)
    cache = AnchorCache.open(cfg.anchor_cache_dir)  # meta, shapes and finite targets
    for path in checkpoints:
        hidden = read_config(path).hidden_size
        if hidden != cache.meta["hidden_dim"]:
            raise ValueError(f"--checkpoints {path} has hidden size {hidden} but --anchor_cache_dir "
                             f"{cfg.anchor_cache_dir} holds features of width {cache.meta['hidden_dim']}: evaluate "
                             "against a cache built from this model family")
    for flag, mix in (("--data_mix", cfg.data_mix), ("--retention_mix", cfg.retention_mix)):
        if mix is None:
            continue
        if cfg.data_root_dir is None:
            raise ValueError(f"{flag} {mix} needs --data_root_dir (the folder of RLDS datasets); found: not set")
        try:
            resolve_mixture(mix)
            check_data_root(cfg.data_root_dir, mix)
        except (ValueError, FileNotFoundError) as e:  # the registry's message speaks of the trainer's flag
            raise ValueError(f"{flag} {mix}: {e}") from e
    for flag, value in (("--eval_batches", cfg.eval_batches), ("--batch_size", cfg.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1; found {value}")
    if cfg.train_anchor_subset < 0:
        raise ValueError(f"--train_anchor_subset must be >= 0; found {cfg.train_anchor_subset}")
    if not cfg.epsilon > 0:
        raise ValueError(f"--epsilon must be > 0; found {cfg.epsilon}")
    for name in ("retention.json", "retention.md"):
        if (cfg.output_dir / name).exists():
            raise FileExistsError(f"--output_dir {cfg.output_dir} already holds {name}; choose another folder")
    resolve_device(cfg.device)
    return checkpoints


def source_drift_warning(path: Path, cache: AnchorCache, metrics: dict, loss_type: str) -> str:
    """A warning when the checkpoint that built the cache does not reproduce its targets; else ''."""
    if Path(path).resolve() != Path(cache.meta["model"]["checkpoint"]).resolve():
        return ""
    loss_type = cache_signal(cache.meta, loss_type).loss_type  # kl and nmse are scale-free, like cosine
    scale = float(np.mean(np.square(cache.arrays["target_features"], dtype=np.float64))) if loss_type == "mse" else 1.0
    drifts = {k: v for k, v in metrics.items() if k.endswith("_L_ret")}
    worst = max(drifts.values(), default=0.0)
    if worst <= SOURCE_DRIFT_TOLERANCE * scale:
        return ""
    return (f"{path} built the anchor cache {cache.path}, yet its drift on the cache is "
            f"{', '.join(f'{k}={v:.3g}' for k, v in drifts.items())} (more than {SOURCE_DRIFT_TOLERANCE:g} x "
            f"{'the targets mean square ' + format(scale, '.3g') if loss_type == 'mse' else '1'}): this evaluation "
            "does not compute the features the cache holds (changed weights, image preprocessing, tokenizer, or a "
            "cache from another machine's kernels); drift numbers against this cache are not trustworthy")


def markdown_table(entries: List[dict]) -> str:
    names = list(dict.fromkeys(k for e in entries for k in e["metrics"]))
    lines = ["| checkpoint | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for e in entries:
        cells = [f"{e['metrics'][n]:.4g}" if n in e["metrics"] else "-" for n in names]
        lines.append(f"| {e['checkpoint']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_checkpoints(cfg: RetentionEvalConfig, checkpoints: List[Path]) -> dict:
    device = resolve_device(cfg.device)
    cache = AnchorCache.open(cfg.anchor_cache_dir)
    sets, notes = anchor_sets(cache, cfg.train_anchor_subset)
    for note in notes:
        print(f"note: {note}", flush=True)
    frames = cfg.eval_batches * cfg.batch_size
    frame_sets = [validation_frames(name, cfg.data_root_dir, mix, frames, cfg.shuffle_buffer_size, cfg.seed)
                  for name, mix in (("val", cfg.data_mix), ("retention", cfg.retention_mix)) if mix]

    def autocast():  # the precision the cache's targets were computed in
        return torch.autocast(device.type, dtype=torch.bfloat16) if cache.meta["dtype"] == "bfloat16" else nullcontext()

    entries, warnings = [], []
    for path in checkpoints:
        model, tokenizer, config = load_pretrained(path, dtype=torch.float32, device=device)
        evaluator = Evaluator(model, anchor_sets=sets, frame_sets=frame_sets, loss_type=cfg.retention_loss_type,
                              processor=ImageProcessor(config), tokenizer=tokenizer,
                              action_tokenizer=ActionTokenizer(n_bins=config.n_action_bins),
                              collator=PaddedCollator(tokenizer.pad_token_id, config.llm_max_length),
                              batch_size=cfg.batch_size, device=device, autocast=autocast)
        row = evaluator(step=0, epsilon=cfg.epsilon)
        metrics = {k: v for k, v in row.items() if k.startswith("eval/")}
        print(json.dumps({"checkpoint": str(path), **metrics, "eval_time_s": round(row["eval_time_s"], 2)}), flush=True)
        warning = source_drift_warning(path, cache, metrics, cfg.retention_loss_type)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
            warnings.append(warning)
        entries.append({"checkpoint": str(path), "metrics": metrics})
        del model, evaluator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"anchor_cache": str(cfg.anchor_cache_dir), "epsilon": cfg.epsilon,
            "retention_loss_type": cache_signal(cache.meta, cfg.retention_loss_type).loss_type, "checkpoints": entries,
            "warnings": warnings}


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        checkpoints = validate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"eval_retention.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    result = evaluate_checkpoints(cfg, checkpoints)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.output_dir / "retention.json").write_text(json.dumps(result, indent=2))
    (cfg.output_dir / "retention.md").write_text(markdown_table(result["checkpoints"]))
    print(f"wrote {cfg.output_dir / 'retention.json'} and retention.md", flush=True)
    return result


if __name__ == "__main__":
    main()
