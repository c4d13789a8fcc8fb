"""Every check that can fail a run, done before any model, data or GPU work.

Reads only small files (the checkpoint's config.json, the cache's meta.json, folder listings), so a
mistake costs seconds, not a day of 8 GPUs. Each failure is one message naming the flag, the
expected and the found value.
"""

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from craft.anchor_cache import AnchorCache, check_cache_matches, read_meta
from craft.retention import cache_layers
from prismatic.conf.train import TrainConfig, config_dict
from prismatic.models import OpenVLA
from prismatic.models.checkpoint import check_weight_files
from prismatic.models.config import VLAModelConfig
from prismatic.models.quantize import bitsandbytes_available
from prismatic.training.checkpointing import (STATE_FILE, check_resume_matches, checkpoint_bytes, complete_checkpoints,
                                              describe_bytes, human_bytes, resolve_resume, save_due)
from prismatic.training.distributed import DistEnv, dist_env_from_environ
from prismatic.training.stages import make_trainable
from prismatic.vla.datasets import check_data_root, resolve_mixture


# Checkpoints that fill more than this share of the free space get a warning: logs, evaluations and other jobs
# share the disk.
DISK_WARN_SHARE = 0.8


class PreflightError(ValueError):
    """The run cannot start; the message says which flag or file and why."""


@dataclass
class Plan:
    """What the checks established, handed to the trainer."""

    run_id: str
    run_dir: Path
    env: DistEnv
    device: torch.device
    grad_accumulation_steps: int
    model_config: VLAModelConfig
    mixture: list
    cache: Optional[AnchorCache] = None
    resume_path: Optional[Path] = None  # the checkpoint to continue from
    resume_changes: List[dict] = field(default_factory=list)  # flags changed since it: {"flag", "old", "new"}
    notes: List[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def cache_meta(self) -> Optional[dict]:
        return self.cache.meta if self.cache else None


def preflight(cfg: TrainConfig) -> Plan:
    try:
        return _preflight(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise PreflightError(str(e)) from e


def _preflight(cfg: TrainConfig) -> Plan:
    env = dist_env_from_environ()
    world_size = env.world_size
    cfg.validate(world_size)
    if cfg.vla.base_quantization != "none" and not bitsandbytes_available():
        raise ValueError(f"--vla.base_quantization {cfg.vla.base_quantization} needs the bitsandbytes package, "
                         "which is not installed (pip install bitsandbytes), or --vla.base_quantization none")
    notes: List[str] = []
    run_id = cfg.make_run_id()
    run_dir = Path(cfg.run_root_dir) / run_id
    resume_path = resolve_resume(cfg.resume_from, run_dir) if cfg.resume_from else None
    resume_changes: List[dict] = []
    if resume_path is not None:
        resume_notes, resume_changes = check_resume_matches(resume_path, config_dict(cfg), world_size)
        notes += resume_notes
    mixture = resolve_mixture(cfg.vla.data_mix)
    if not cfg.vla.data_mix.startswith("libero"):
        warnings.warn(f"--vla.data_mix {cfg.vla.data_mix!r} is not a LIBERO mixture; CRaFT is tuned and "
                      "evaluated on LIBERO (e.g. --vla.data_mix libero_90)")
    check_data_root(cfg.data_root_dir, cfg.vla.data_mix)
    if cfg.vla.l2_sp_weight > 0 and cfg.pretrained_checkpoint is None:
        raise ValueError("--vla.l2_sp_weight pulls the weights toward those of --pretrained_checkpoint, which is not "
                         "set (pass it also when resuming)")
    if (resume_path is None or cfg.vla.use_lora) and cfg.pretrained_checkpoint is None:
        raise ValueError("--pretrained_checkpoint is required (with LoRA, also to resume: it is the frozen base): a "
                         "local OpenVLA checkpoint folder (config.json + safetensors); found: not set")
    weights_from = cfg.pretrained_checkpoint if cfg.vla.use_lora or not resume_path else resume_path
    model_config = _read_model_config(weights_from)
    check_weight_files(weights_from)  # a truncated or damaged file is named now, not deep inside the loader
    n_states = model_config.num_hidden_layers + 1

    cache = None
    outside = [layer for layer in cfg.craft.layers if not -n_states <= layer < n_states]
    if cfg.craft.enabled and cfg.craft.retention_mode == "hidden" and outside:
        raise ValueError(
            f"--craft.{'hidden_layers' if cfg.craft.hidden_layers else 'hidden_layer'} must index the model's "
            f"{n_states} hidden states (from {-n_states} to {n_states - 1}); found {outside[0]}"
        )
    if cfg.vla.replay_batch_size and cfg.craft.anchor_cache_dir is None:
        raise ValueError(f"--vla.replay_batch_size {cfg.vla.replay_batch_size} replays anchor frames from "
                         "--craft.anchor_cache_dir, which is not set")
    if cfg.craft.anchor_cache_dir is not None:  # with --craft.enabled false, the cache serves the drift evaluation
        cache = _open_cache(cfg, model_config)
        produced_by = cache.meta.get("model", {}).get("checkpoint")
        if produced_by and cfg.pretrained_checkpoint and \
                Path(produced_by).resolve() != Path(cfg.pretrained_checkpoint).resolve():
            notes.append(f"the anchor cache was built from {produced_by}, training starts from "
                         f"{cfg.pretrained_checkpoint}: L_ret > 0 from the first step")

    if world_size % env.local_world_size:
        raise ValueError(f"world size {world_size} is not a multiple of the processes per node {env.local_world_size}")
    device = resolve_device(cfg.device, env)
    if device.type == "cpu" and cfg.vla.enable_mixed_precision_training:
        notes.append("bf16 mixed precision on a CPU: the demo's step measured 1.3-1.7x slower than in float32, even "
                     "on a CPU with bf16 instructions (benchmarks/RESULTS.md, section 6); for a CPU run pass "
                     "--vla.enable_mixed_precision_training false, with an anchor cache built with --dtype float32")

    if resume_path is None and not cfg.dry_run_batches and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} already holds a run; continue it with --resume_from latest, or pick "
            "another --run_id or --run_id_note (nothing there was touched)"
        )
    notes += _check_disk_space(cfg, run_dir, resume_path, model_config, weights_from, world_size)
    return Plan(
        run_id=run_id, run_dir=run_dir, env=env, device=device,
        grad_accumulation_steps=cfg.vla.grad_accumulation_steps(world_size), model_config=model_config,
        mixture=mixture, cache=cache, resume_path=resume_path, resume_changes=resume_changes, notes=notes,
    )


def _open_cache(cfg: TrainConfig, model_config: VLAModelConfig) -> AnchorCache:
    """The guide's cache checks against the run; a plain fine-tuning run is held only to what its drift
    evaluation needs (the cache's own layer and pooling, this model's width and compute dtype)."""
    meta = read_meta(cfg.craft.anchor_cache_dir)
    craft = cfg.craft if cfg.craft.enabled else None
    mode = craft.retention_mode if craft else meta.get("retention_mode", "hidden")
    check_cache_matches(
        meta, retention_mode=mode, layers=craft.layers if craft else cache_layers(meta) if mode == "hidden" else (),
        pooling=craft.pooling if craft else meta.get("pooling"), dtype=cfg.vla.compute_dtype,
        hidden_dim=model_config.hidden_size,
        anchor_batch_size=max(craft.anchor_batch_size if craft else 1, cfg.vla.replay_batch_size),
        cache_dir=cfg.craft.anchor_cache_dir, dtype_flag="--vla.enable_mixed_precision_training",
        model_flag="--pretrained_checkpoint",
        needs_actions="--vla.replay_batch_size" if cfg.vla.replay_batch_size else None,
    )
    return AnchorCache.open(cfg.craft.anchor_cache_dir)  # cheap: validates and memory-maps the arrays


def planned_checkpoint_bytes(cfg: TrainConfig, model_config: VLAModelConfig, source_dir: Path,
                             world_size: int) -> dict:
    """What one checkpoint of the run will take, by part, from the model built on the meta device (parameter
    counts and dtypes as the trainer sets them up, no memory)."""
    with torch.device("meta"):
        model = OpenVLA.from_config(model_config)
        model = make_trainable(model, cfg.vla)
    return checkpoint_bytes(model, lora_scaling=cfg.vla.lora_scaling if cfg.vla.use_lora else None,
                            merge_lora=cfg.vla.merge_on_save, source_dir=source_dir, world_size=world_size)


def _check_disk_space(cfg: TrainConfig, run_dir: Path, resume_path: Optional[Path], model_config: VLAModelConfig,
                      weights_from: Path, world_size: int) -> List[str]:
    """Refuses a run whose checkpoints (--keep_last_checkpoints of them, plus the one being written) cannot fit in
    the free space of --run_root_dir's filesystem; a note when they would fill most of it. A dry run writes
    nothing: it gets the refusal as a note, for the full run it prepares."""
    one = planned_checkpoint_bytes(cfg, model_config, weights_from, world_size)
    start = json.loads((resume_path / STATE_FILE).read_text())["step"] if resume_path else 0
    end = cfg.vla.max_steps
    saves = sum(save_due(s, end, cfg.save_interval) for s in range(start + 1, end + 1))
    have = len(complete_checkpoints(run_dir))
    keep = cfg.keep_last_checkpoints or have + saves
    new = max(min(have + saves, keep + 1) - have, min(saves, 1))  # the newest `keep`, plus the one being written
    needed = new * sum(one.values())
    folder = next(p for p in [run_dir, *run_dir.absolute().parents] if p.exists())
    free = shutil.disk_usage(folder).free
    what = (f"{new} checkpoint(s) of {describe_bytes(one)} at once (the run saves {saves} time(s) at --save_interval "
            f"{cfg.save_interval} and keeps --keep_last_checkpoints {cfg.keep_last_checkpoints or 'null (all)'}, plus "
            "the one being written)")
    if needed > free:
        refusal = (f"--run_root_dir {cfg.run_root_dir}: its filesystem has {human_bytes(free)} ({free:,} bytes) free, "
                   f"the run's checkpoints need {human_bytes(needed)} ({needed:,} bytes): {what}. Free space, point "
                   "--run_root_dir at a larger disk, or lower --keep_last_checkpoints")
        if cfg.dry_run_batches:
            return [f"without --dry_run_batches this run would stop: {refusal}"]
        raise ValueError(refusal)
    if needed > DISK_WARN_SHARE * free:
        return [f"the run's checkpoints will take {human_bytes(needed)} of the {human_bytes(free)} free under "
                f"--run_root_dir {cfg.run_root_dir}: {what}"]
    return []


def _read_model_config(checkpoint: Path) -> VLAModelConfig:
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--pretrained_checkpoint {checkpoint}: expected {config_file}, which does not exist")
    return VLAModelConfig.from_dict(json.loads(config_file.read_text()))


def resolve_device(name: str, env: DistEnv = DistEnv()) -> torch.device:
    """This process's device: the GPU of its local rank, or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; found {name!r}")
    if name == "cuda" and torch.cuda.device_count() <= env.local_rank:
        raise ValueError(f"--device cuda: local rank {env.local_rank} needs a GPU but {torch.cuda.device_count()} "
                         "are visible")
    return torch.device("cuda", env.local_rank) if name == "cuda" else torch.device("cpu")
