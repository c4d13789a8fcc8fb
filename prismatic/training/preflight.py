"""Every check that can fail a run, done before any model, data or GPU work.

Reads only small files (the checkpoint's config.json, the cache's meta.json, folder listings), so a
mistake costs seconds, not a day of 8 GPUs. Each failure is one message naming the flag, the
expected and the found value.
"""

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from craft.anchor_cache import check_cache_matches, read_meta
from prismatic.conf.train import TRACKERS, TrainConfig
from prismatic.models.config import VLAModelConfig
from prismatic.vla.datasets import check_data_root, resolve_mixture


class PreflightError(ValueError):
    """The run cannot start; the message says which flag or file and why."""


@dataclass
class Plan:
    """What the checks established, handed to the trainer."""

    run_id: str
    run_dir: Path
    device: torch.device
    world_size: int
    grad_accumulation_steps: int
    model_config: VLAModelConfig
    mixture: list
    cache_meta: Optional[dict] = None
    notes: List[str] = field(default_factory=list)


def preflight(cfg: TrainConfig) -> Plan:
    try:
        return _preflight(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise PreflightError(str(e)) from e


def _preflight(cfg: TrainConfig) -> Plan:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != 1:
        raise ValueError(
            f"train_craft.py runs one process per job in this version; torchrun started {world_size} "
            "(--nproc-per-node / --nnodes)"
        )
    cfg.vla.validate(world_size)
    cfg.craft.validate()
    notes = []
    mixture = resolve_mixture(cfg.vla.data_mix)
    if not cfg.vla.data_mix.startswith("libero"):
        warnings.warn(f"--vla.data_mix {cfg.vla.data_mix!r} is not a LIBERO mixture; CRaFT is tuned and "
                      "evaluated on LIBERO (e.g. --vla.data_mix libero_90)")
    check_data_root(cfg.data_root_dir, cfg.vla.data_mix)
    model_config = _read_model_config(cfg.pretrained_checkpoint)
    n_states = model_config.num_hidden_layers + 1

    cache_meta = None
    if cfg.craft.enabled:
        if not -n_states <= cfg.craft.hidden_layer < n_states:
            raise ValueError(
                f"--craft.hidden_layer must index the model's {n_states} hidden states "
                f"(from {-n_states} to {n_states - 1}); found {cfg.craft.hidden_layer}"
            )
        cache_meta = read_meta(cfg.craft.anchor_cache_dir)
        check_cache_matches(
            cache_meta, hidden_layer=cfg.craft.hidden_layer, pooling=cfg.craft.pooling,
            dtype=cfg.vla.compute_dtype, hidden_dim=model_config.hidden_size,
            anchor_batch_size=cfg.craft.anchor_batch_size, cache_dir=cfg.craft.anchor_cache_dir,
        )
        produced_by = cache_meta.get("model", {}).get("checkpoint")
        if produced_by and Path(produced_by).resolve() != Path(cfg.pretrained_checkpoint).resolve():
            notes.append(f"the anchor cache was built from {produced_by}, training starts from "
                         f"{cfg.pretrained_checkpoint}: L_ret > 0 from the first step")

    for tracker in cfg.trackers:
        if tracker not in TRACKERS:
            raise ValueError(f"--trackers must be a subset of {list(TRACKERS)}; found {tracker!r}")
    if cfg.save_interval < 1:
        raise ValueError(f"--save_interval must be >= 1; found {cfg.save_interval}")
    if cfg.dry_run_batches < 0:
        raise ValueError(f"--dry_run_batches must be >= 0; found {cfg.dry_run_batches}")

    run_id = cfg.make_run_id()
    run_dir = Path(cfg.run_root_dir) / run_id
    if not cfg.dry_run_batches and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run directory {run_dir} already holds a run; pick another --run_id or --run_id_note "
            "(nothing there was touched)"
        )
    return Plan(
        run_id=run_id, run_dir=run_dir, device=resolve_device(cfg.device), world_size=world_size,
        grad_accumulation_steps=cfg.vla.grad_accumulation_steps(world_size), model_config=model_config,
        mixture=mixture, cache_meta=cache_meta, notes=notes,
    )


def _read_model_config(checkpoint: Optional[Path]) -> VLAModelConfig:
    if checkpoint is None:
        raise ValueError("--pretrained_checkpoint is required: a local OpenVLA checkpoint folder (config.json + "
                         "safetensors); found: not set")
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--pretrained_checkpoint {checkpoint}: expected {config_file}, which does not exist")
    return VLAModelConfig.from_dict(json.loads(config_file.read_text()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda; found {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible")
    return torch.device(name)
