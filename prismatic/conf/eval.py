"""Evaluation settings: `--eval.*` during training, and `vla-scripts/eval_retention.py` for finished checkpoints."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from craft.config import CraftConfig


@dataclass
class EvalConfig:
    # Evaluate every N optimizer steps; 0 = only at checkpoints and at the end.
    interval: int = 500
    # Validation batches per evaluation, over all processes together (the same frames whatever the world size).
    batches: int = 8
    # A second data mix standing for old knowledge: its validation split gets the same action metrics.
    retention_mix: Optional[str] = None
    # Training anchors whose drift is also reported (a fixed, evenly spaced subset of the cache).
    train_anchor_subset: int = 64
    # Frames mixed before the fixed validation batches are taken (more = more episodes represented).
    shuffle_buffer_size: int = 10_000
    # Evaluate once before the first step: the starting model's row (drift ~0, accuracies before training).
    at_start: bool = True
    during_dry_run: bool = False

    def validate(self, data_root_dir: Path) -> None:
        """Before any model or data work: the numbers, and that the retention mix exists under the data root."""
        for flag, value, low in (("interval", self.interval, 0), ("batches", self.batches, 1),
                                 ("train_anchor_subset", self.train_anchor_subset, 0),
                                 ("shuffle_buffer_size", self.shuffle_buffer_size, 1)):
            if value < low:
                raise ValueError(f"--eval.{flag} must be >= {low}; found {value}")
        if self.retention_mix is not None:
            from prismatic.vla.datasets import check_data_root, resolve_mixture

            try:
                resolve_mixture(self.retention_mix)
                check_data_root(data_root_dir, self.retention_mix)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--eval.retention_mix {self.retention_mix}: {e}") from e


@dataclass
class RetentionEvalConfig:
    """`eval_retention.py`: the evaluation's metrics for finished checkpoints, against one anchor cache."""

    checkpoints: List[Path] = field(default_factory=list)  # checkpoint folders, or run folders of step-* ones
    anchor_cache_dir: Optional[Path] = None
    output_dir: Optional[Path] = None
    data_root_dir: Optional[Path] = None
    data_mix: Optional[str] = None  # the new data: its validation split gives eval/val_*
    retention_mix: Optional[str] = EvalConfig.retention_mix
    eval_batches: int = EvalConfig.batches
    batch_size: int = 8
    train_anchor_subset: int = EvalConfig.train_anchor_subset
    shuffle_buffer_size: int = EvalConfig.shuffle_buffer_size
    retention_loss_type: Optional[str] = CraftConfig.retention_loss_type  # null: the cache's mode default
    epsilon: float = CraftConfig.epsilon  # the budget the fraction of anchors over it is counted against
    device: str = "auto"
    seed: int = 7
