"""The top-level `train_craft.py` configuration: one field per concern."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from craft.config import CraftConfig
from prismatic.conf.vla import OpenVLALiberoConfig, VLAConfig

TRACKERS = ("jsonl", "wandb")


@dataclass
class TrainConfig:
    vla: VLAConfig = field(default_factory=OpenVLALiberoConfig)
    craft: CraftConfig = field(default_factory=CraftConfig)

    data_root_dir: Path = Path("datasets/rlds")  # holds <dataset>/<version>/ RLDS folders
    run_root_dir: Path = Path("runs")  # logs and checkpoints go to <run_root_dir>/<run_id>/
    pretrained_checkpoint: Optional[Path] = None  # a local OpenVLA checkpoint folder (HF layout)
    run_id: Optional[str] = None
    run_id_note: Optional[str] = None

    save_interval: int = 2500
    keep_last_checkpoints: Optional[int] = 3  # older finished checkpoints are deleted; None keeps all
    # Continue a run from `<run_root_dir>/<run_id>/checkpoints/step-N` (a path) or its newest one ("latest").
    resume_from: Optional[str] = None
    image_aug: bool = False
    seed: int = 7
    device: str = "auto"  # auto | cpu | cuda
    sharding_strategy: str = "full-shard"  # with several processes: full-shard | hybrid-shard (per node)
    dist_timeout_s: int = 1800  # a collective that waits longer than this ends the job

    trackers: Tuple[str, ...] = ("jsonl",)
    wandb_project: str = "openvla-craft"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "online"  # "offline" logs locally, no network needed

    # Run N full steps, print the pre-flight report and exit; nothing is written.
    dry_run_batches: int = 0

    def make_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        mode = "craft" if self.craft.enabled else "bc"
        run_id = f"{self.vla.vla_id}+{self.vla.data_mix}+{mode}+b{self.vla.per_device_batch_size}+x{self.seed}"
        if self.run_id_note:
            run_id += f"--{self.run_id_note}"
        return run_id + ("--image_aug" if self.image_aug else "")
