"""The offline anchor cache: model inputs and pretrained target features, as memory-mapped .npy files.

Layout of a cache folder:
    meta.json            schema version, how the features were made, array shapes
    images.npy           uint8   [N, H, W, 3]   anchor camera images, as the data pipeline yields them
    input_ids.npy        int32   [N, L]         prompt token ids, right-padded
    attention_mask.npy   bool    [N, L]
    target_features.npy  float32 [N, D]         pooled hidden state of the pretrained model
    instructions.json    the N instructions, for people reading the cache
"""

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from craft.config import CraftConfigError

FORMAT_VERSION = 1
ARRAYS = {
    "images": np.uint8,
    "input_ids": np.int32,
    "attention_mask": np.bool_,
    "target_features": np.float32,
}
META_KEYS = ("format_version", "num_anchors", "hidden_dim", "hidden_layer", "pooling", "dtype", "shapes")
LARGE_ANCHOR_BATCH = 64


class AnchorCacheError(CraftConfigError):
    """The anchor cache folder is missing, incomplete or corrupt."""


class AnchorCacheWriter:
    """Fills the arrays row by row into a temporary folder; `close()` publishes it atomically."""

    def __init__(self, out_dir: Path, num_anchors: int, image_shape, prompt_len: int, hidden_dim: int,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"anchor cache output {self.out_dir} already exists and is not empty; "
                "choose another --output_dir or pass --overwrite true"
            )
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        shapes = {
            "images": (num_anchors, *image_shape),
            "input_ids": (num_anchors, prompt_len),
            "attention_mask": (num_anchors, prompt_len),
            "target_features": (num_anchors, hidden_dim),
        }
        self.arrays = {
            name: np.lib.format.open_memmap(self.tmp_dir / f"{name}.npy", mode="w+", dtype=ARRAYS[name],
                                            shape=shape)
            for name, shape in shapes.items()
        }
        self.num_anchors, self.hidden_dim, self.filled = num_anchors, hidden_dim, 0
        self.instructions: List[str] = []

    def append(self, rows: Dict[str, np.ndarray], instructions: List[str]) -> None:
        n = len(instructions)
        if self.filled + n > self.num_anchors:
            raise ValueError(f"anchor cache holds {self.num_anchors} anchors; got {self.filled + n}")
        for name, arr in self.arrays.items():
            arr[self.filled : self.filled + n] = rows[name]
        self.instructions.extend(instructions)
        self.filled += n

    def close(self, meta: dict) -> Path:
        if self.filled != self.num_anchors:
            raise ValueError(f"anchor cache expects {self.num_anchors} anchors; only {self.filled} written")
        for arr in self.arrays.values():
            arr.flush()
        meta = {
            "format_version": FORMAT_VERSION,
            "num_anchors": self.num_anchors,
            "hidden_dim": self.hidden_dim,
            "shapes": {name: list(arr.shape) for name, arr in self.arrays.items()},
            **meta,
        }
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise ValueError(f"anchor cache meta is missing {missing}")
        (self.tmp_dir / "instructions.json").write_text(json.dumps(self.instructions, indent=0))
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        self.arrays.clear()
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir


@dataclass
class AnchorCache:
    """A validated, memory-mapped cache; rows are read only when a batch asks for them."""

    path: Path
    meta: dict
    arrays: Dict[str, np.ndarray]

    @property
    def num_anchors(self) -> int:
        return int(self.meta["num_anchors"])

    @classmethod
    def open(cls, path: Path) -> "AnchorCache":
        path = Path(path)
        meta = read_meta(path)
        arrays = {}
        for name, dtype in ARRAYS.items():
            f = path / f"{name}.npy"
            expected = tuple(meta["shapes"][name])
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise AnchorCacheError(f"anchor cache {path} is missing {f.name} (--craft.anchor_cache_dir)")
            except ValueError as e:
                raise AnchorCacheError(
                    f"anchor cache file {f} is corrupt or truncated (expected {dtype.__name__} {expected}): {e}"
                )
            if arr.shape != expected or arr.dtype != dtype:
                raise AnchorCacheError(
                    f"anchor cache file {f} holds {arr.dtype} {arr.shape}; meta.json expects "
                    f"{np.dtype(dtype)} {expected}"
                )
            arrays[name] = arr
        n, d = meta["num_anchors"], meta["hidden_dim"]
        if {a.shape[0] for a in arrays.values()} != {n} or arrays["target_features"].shape[1] != d:
            raise AnchorCacheError(
                f"anchor cache {path}: arrays disagree with meta.json (num_anchors={n}, hidden_dim={d}); "
                f"found shapes { {k: a.shape for k, a in arrays.items()} }"
            )
        return cls(path=path, meta=meta, arrays=arrays)

    def batch(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows `indices` of every array, copied out of the memory map."""
        order = np.argsort(indices)  # sorted reads are sequential on disk
        rows = {name: arr[np.asarray(indices)[order]] for name, arr in self.arrays.items()}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {name: r[inverse] for name, r in rows.items()}


def read_meta(path: Path) -> dict:
    """meta.json alone: cheap enough for the pre-flight checks."""
    path = Path(path)
    if not path.is_dir():
        raise AnchorCacheError(
            f"--craft.anchor_cache_dir {path} does not exist; expected a folder made by "
            "vla-scripts/build_anchor_cache.py"
        )
    meta_file = path / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise AnchorCacheError(f"--craft.anchor_cache_dir {path} has no meta.json; found {sorted(os.listdir(path))}")
    except json.JSONDecodeError as e:
        raise AnchorCacheError(f"anchor cache {meta_file} is not valid JSON: {e}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise AnchorCacheError(f"anchor cache {meta_file} lacks the keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise AnchorCacheError(
            f"anchor cache {meta_file} has format_version {meta['format_version']}; this version reads "
            f"{FORMAT_VERSION}: rebuild it with vla-scripts/build_anchor_cache.py"
        )
    return meta


def check_cache_matches(meta: dict, *, hidden_layer: int, pooling: str, dtype: str, hidden_dim: int,
                        anchor_batch_size: int, cache_dir: Optional[Path] = None) -> None:
    """The guide's checklist: the cache must describe the features this run will compute."""
    where = f"the anchor cache {cache_dir}" if cache_dir else "the anchor cache"
    for flag, found, cached in (
        ("--craft.hidden_layer", hidden_layer, meta["hidden_layer"]),
        ("--craft.pooling", pooling, meta["pooling"]),
    ):
        if found != cached:
            raise CraftConfigError(
                f"{flag} is {found!r} but {where} was built with {cached!r}: pass {flag} {cached} "
                "or rebuild the cache with the new value"
            )
    if dtype != meta["dtype"]:
        raise CraftConfigError(
            f"training computes in {dtype} (--vla.enable_mixed_precision_training) but {where} "
            f"holds features computed in {meta['dtype']}; rebuild the cache with --dtype {dtype}"
        )
    if hidden_dim != meta["hidden_dim"]:
        raise CraftConfigError(
            f"{where} holds target_features of width {meta['hidden_dim']} but the model's hidden size "
            f"is {hidden_dim} (--pretrained_checkpoint): build the cache from this model"
        )
    n = meta["num_anchors"]
    if anchor_batch_size > n:
        raise CraftConfigError(
            f"--craft.anchor_batch_size is {anchor_batch_size} but {where} holds only {n} anchors"
        )
    if anchor_batch_size > LARGE_ANCHOR_BATCH:
        warnings.warn(
            f"--craft.anchor_batch_size {anchor_batch_size} is large: each step runs that many extra "
            "samples per device; start small (4-16) and raise it once training is stable"
        )


def anchor_indices(step: int, batch_size: int, num_anchors: int, seed: int, rank: int = 0,
                   world_size: int = 1) -> np.ndarray:
    """Anchors for (step, rank): a fresh permutation per pass over the cache, disjoint across ranks.

    A pure function of its arguments, so a resumed run draws exactly the anchors it would have drawn.
    """
    start = (step * world_size + rank) * batch_size
    positions = np.arange(start, start + batch_size)
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(positions // num_anchors):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_anchors)
        sel = positions // num_anchors == epoch
        out[sel] = perm[positions[sel] % num_anchors]
    return out
