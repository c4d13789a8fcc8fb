"""Action statistics for normalisation: computed once over a whole dataset, then cached.

The cache file sits next to the dataset, named by a hash of the dataset's `dataset_info.json` and of
what changes the numbers (the standardize function's source, the proprio keys, the layout below), so a
changed dataset or transform never reuses stale numbers. The format is upstream OpenVLA's
`dataset_statistics.json` entry, which the exported model's `norm_stats` and inference rely on.

Like upstream's fine-tuning, training reads no proprioception, so the `proprio` entry holds the statistics
of zeros of the action's width (all 0), exactly as upstream writes them.
"""

import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from prismatic.vla.datasets.registry import DatasetConfig

log = logging.getLogger(__name__)

FALLBACK_CACHE_DIR = Path("~/.cache/prismatic").expanduser()
# Part of the cache key: files cached with another layout (an earlier one held LIBERO-state proprio) are not reused.
STATISTICS_LAYOUT = "proprio = zeros of the action width"


def summarize(actions: np.ndarray, num_trajectories: int) -> dict:
    """Statistics of all frames, as lists so they serialise to JSON unchanged."""

    def stats(x: np.ndarray) -> dict:
        x = np.asarray(x, dtype=np.float64)
        return {
            "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(),
            "max": x.max(0).tolist(),
            "min": x.min(0).tolist(),
            "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist(),
        }

    return {
        "action": stats(actions),
        "proprio": stats(np.zeros_like(actions)),
        "num_transitions": int(len(actions)),
        "num_trajectories": int(num_trajectories),
    }


def statistics_filename(builder_dir, config: DatasetConfig) -> str:
    standardize = config.standardize
    try:
        standardize_id = inspect.getsource(standardize) if standardize else "identity"
    except (OSError, TypeError):  # e.g. a lambda defined in an interactive session
        standardize_id = repr(standardize)
    digest = hashlib.sha256()
    digest.update((Path(builder_dir) / "dataset_info.json").read_bytes())
    digest.update(repr(list(config.state_obs_keys)).encode())
    digest.update(standardize_id.encode())
    digest.update(STATISTICS_LAYOUT.encode())
    return f"dataset_statistics_{digest.hexdigest()}.json"


def compute_or_load_statistics(builder_dir, config: DatasetConfig, compute_fn: Callable[[], dict]) -> dict:
    """Load the cached statistics of the dataset at `builder_dir`, or call `compute_fn` and cache its result.

    The cache goes next to the dataset, or to ~/.cache/prismatic/ when that folder is read-only.
    """
    filename = statistics_filename(builder_dir, config)
    candidates = [Path(builder_dir) / filename, FALLBACK_CACHE_DIR / filename]
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())

    log.info("Computing statistics of %s (once; cached afterwards)", config.name)
    stats = compute_fn()
    for path in candidates:
        try:
            _write_atomically(path, json.dumps(stats))
            log.info("Saved statistics of %s to %s", config.name, path)
            break
        except OSError:
            continue
    return stats


def _write_atomically(path: Path, text: str) -> None:
    """Several training processes may compute at once: readers must never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normalize_bounds_q99(x, stats: dict, mask):
    """BOUNDS_Q99 on a TF tensor: clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on the masked dims.

    Masked dims that never vary (min == max) become 0; unmasked dims (the EEF_POS gripper) pass unchanged.
    """
    import tensorflow as tf

    low = tf.constant(stats["q01"], tf.float32)
    high = tf.constant(stats["q99"], tf.float32)
    constant = tf.constant(np.asarray(stats["min"]) == np.asarray(stats["max"]))
    scaled = tf.clip_by_value(2.0 * (x - low) / (high - low + 1e-8) - 1.0, -1.0, 1.0)
    return tf.where(tf.constant(list(mask)), tf.where(constant, 0.0, scaled), x)
