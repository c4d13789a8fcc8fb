"""The top-level `train_craft.py` configuration, one dataclass per concern.

Model, LoRA, data and optimisation are `--vla.*` (prismatic/conf/vla.py), CRaFT is `--craft.*`
(craft/config.py), evaluation is `--eval.*` (prismatic/conf/eval.py); run-level concerns below are joined
into `TrainConfig` so their flags stay top-level
(`--save_interval`, `--trackers`, ...). `RESUME_SAFE` lists the flags a resumed run may change, and
`RESUME_RETUNABLE` those it may change with `--resume_with_changes true`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from craft.config import CraftConfig
from prismatic.conf.eval import EvalConfig
from prismatic.conf.vla import OpenVLALiberoConfig, VLAConfig
from prismatic.training.distributed import SHARDING_STRATEGIES

TRACKERS = ("jsonl", "wandb")


@dataclass
class RunConfig:
    data_root_dir: Path = Path("datasets/rlds")  # holds <dataset>/<version>/ RLDS folders
    image_aug: bool = False
    run_root_dir: Path = Path("runs")  # logs and checkpoints go to <run_root_dir>/<run_id>/
    pretrained_checkpoint: Optional[Path] = None  # a local OpenVLA checkpoint folder (HF layout)
    run_id: Optional[str] = None
    run_id_note: Optional[str] = None
    seed: int = 7
    # Run N full steps, print the pre-flight report and exit; nothing is written.
    dry_run_batches: int = 0

    def validate_run(self) -> None:
        if self.dry_run_batches < 0:
            raise ValueError(f"--dry_run_batches must be >= 0; found {self.dry_run_batches}")


@dataclass
class DistributionConfig:
    device: str = "auto"  # auto | cpu | cuda
    sharding_strategy: str = "full-shard"  # with several processes: full-shard | hybrid-shard (per node)
    dist_timeout_s: int = 1800  # a collective that waits longer than this ends the job

    def validate_distribution(self) -> None:
        if self.sharding_strategy not in SHARDING_STRATEGIES:
            raise ValueError(f"--sharding_strategy must be one of {list(SHARDING_STRATEGIES)}; "
                             f"found {self.sharding_strategy!r}")
        if self.dist_timeout_s < 1:
            raise ValueError(f"--dist_timeout_s must be >= 1; found {self.dist_timeout_s}")


@dataclass
class CheckpointConfig:
    save_interval: int = 2500
    keep_last_checkpoints: Optional[int] = 3  # older finished checkpoints are deleted; None keeps all
    # Continue a run from `<run_root_dir>/<run_id>/checkpoints/step-N` (a path) or its newest one ("latest").
    resume_from: Optional[str] = None
    # Also accept changes to the budget, its schedule, the dual update and the learning rate (RESUME_RETUNABLE),
    # keeping optimizer state, lambda, RNG and data position; each change goes to changes.jsonl.
    resume_with_changes: bool = False

    def validate_checkpointing(self) -> None:
        if self.save_interval < 1:
            raise ValueError(f"--save_interval must be >= 1; found {self.save_interval}")
        if self.keep_last_checkpoints is not None and self.keep_last_checkpoints < 1:
            raise ValueError(f"--keep_last_checkpoints must be >= 1 (or null to keep all); "
                             f"found {self.keep_last_checkpoints}")
        if self.resume_with_changes and not self.resume_from:
            raise ValueError("--resume_with_changes true applies to a resume: pass --resume_from too (latest, or a "
                             "checkpoint folder); found --resume_from not set")


@dataclass
class TrackingConfig:
    trackers: Tuple[str, ...] = ("jsonl",)
    wandb_project: str = "openvla-craft"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "online"  # "offline" logs locally, no network needed

    def validate_tracking(self) -> None:
        for tracker in self.trackers:
            if tracker not in TRACKERS:
                raise ValueError(f"--trackers must be a subset of {list(TRACKERS)}; found {tracker!r}")


@dataclass
class TrainConfig(RunConfig, DistributionConfig, CheckpointConfig, TrackingConfig):
    vla: VLAConfig = field(default_factory=OpenVLALiberoConfig)
    craft: CraftConfig = field(default_factory=CraftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int) -> None:
        self.vla.validate(world_size)
        self.craft.validate()
        self.eval.validate(self.data_root_dir)
        self.validate_run()
        self.validate_distribution()
        self.validate_checkpointing()
        self.validate_tracking()

    def make_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        mode = "craft" if self.craft.enabled else "bc"
        run_id = f"{self.vla.vla_id}+{self.vla.data_mix}+{mode}+b{self.vla.per_device_batch_size}+x{self.seed}"
        if self.run_id_note:
            run_id += f"--{self.run_id_note}"
        return run_id + ("--image_aug" if self.image_aug else "")


# Flags whose change keeps a resumed run exact: how long it runs, what is written and where, how it is
# watched. Anything else (data, batch arithmetic, seed, model, LoRA, CRaFT, ...) stops a resume.
RESUME_SAFE = (
    "vla.max_steps", "vla.merge_on_save", "vla.expected_world_size", "save_interval", "keep_last_checkpoints",
    "resume_from", "resume_with_changes", "run_id", "run_id_note", "run_root_dir", "dry_run_batches",
    "dist_timeout_s", "trackers", "wandb_project", "wandb_entity", "wandb_mode",
    "craft.keep_weights_gathered",  # where the gathered weights live, not what they are
)
RESUME_SAFE_PREFIXES = ("eval.",)  # evaluation settings change no training step
# Flags a resume may change with --resume_with_changes true: the run then differs from an uninterrupted one, as
# meant, from the checkpoint on. The constraint is rebuilt from the new values with its lambda, controller state
# and schedule position loaded; the optimizer's learning rate is the new one at the LR schedule's position.
RESUME_RETUNABLE = (
    "craft.epsilon", "craft.epsilon_schedule", "craft.epsilon_start", "craft.epsilon_schedule_steps",
    "craft.lambda_lr", "craft.dual_update", "craft.violation", "craft.lambda_kp", "craft.violation_ema",
    "craft.lambda_max", "craft.conflict_projection", "craft.retention_interval", "vla.learning_rate",
)
RESUME_BOOKKEEPING = ("resume_from", "resume_with_changes")  # differ on every resume: not a change of the run


def config_dict(cfg: TrainConfig) -> dict:
    """The configuration as plain JSON values (paths as strings)."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def flat_flags(config: dict, prefix: str = "") -> Dict[str, object]:
    """{"vla": {"data_mix": ...}} -> {"vla.data_mix": ...}: keys as users type them after `--`."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_flags(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flag_changes(saved: dict, current: dict) -> List[Tuple[str, object, object]]:
    """(flag, saved value, current value) for every flag that differs, in flag order; a flag unknown to the run is
    "(not set)" there, one unknown to the checkpoint has its default. Resume bookkeeping is left out."""
    before, now = flat_flags(saved), flat_flags(current)
    # A checkpoint written before a flag existed ran as that flag's default does (new flags default to the old
    # behaviour): it is unchanged if the run keeps the default.
    before = {**{flag: value for flag, value in flat_flags(config_dict(TrainConfig())).items() if flag in now},
              **before}
    missing = "(not set)"
    return [(flag, before.get(flag, missing), now.get(flag, missing)) for flag in sorted(set(before) | set(now))
            if flag not in RESUME_BOOKKEEPING and before.get(flag, missing) != now.get(flag, missing)]


def resume_breaking_changes(saved: dict, current: dict, retuning: bool = False) -> List[str]:
    """`--flag saved -> current` for every flag whose change would make the resumed run differ from an
    uninterrupted one (with `retuning`, one that --resume_with_changes cannot honour either). A flag unknown to
    either side counts as changed, unless resume-safe."""
    allowed = RESUME_SAFE + (RESUME_RETUNABLE if retuning else ())
    return [f"--{flag} {old} -> {new}" for flag, old, new in flag_changes(saved, current)
            if flag not in allowed and not flag.startswith(RESUME_SAFE_PREFIXES)]
