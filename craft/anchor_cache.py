"""The offline anchor cache: model inputs and pretrained target features, as memory-mapped .npy files.

Layout of a cache folder:
    meta.json            schema version, the retention mode and how its targets were made, array shapes
    images.npy           uint8   [N, H, W, 3]   anchor camera images, as the data pipeline yields them
    input_ids.npy        int32   [N, L]         prompt token ids, right-padded
    attention_mask.npy   bool    [N, L]
    actions.npy          float32 [N, A]         each anchor's recorded action, normalised (caches built since
                                                action retention and replay exist)
    and the targets of the cache's retention mode (meta.json "retention_mode"; caches without it are "hidden"):
    target_features.npy  float32 [N, K*D]       hidden: pooled hidden state of the pretrained model, the K layers of
                                                meta "hidden_layers" side by side
    target_logprobs.npy  float32 [N, A, 256]    action: the pretrained model's log-probabilities over the action
                                                bins at each action token, teacher-forced with the recorded action
    instructions.json    the N instructions, for people reading the cache
    episodes.json        the episode each anchor was taken from (caches built since held-out sets exist)
    heldout/             optional: an anchor cache of the same format from episodes disjoint from these
                         anchors' episodes; training never draws from it, evaluation measures drift on it
"""

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from craft.config import CraftConfigError

FORMAT_VERSION = 1
ARRAYS = {
    "images": np.uint8,
    "input_ids": np.int32,
    "attention_mask": np.bool_,
    "actions": np.float32,
    "target_features": np.float32,
    "target_logprobs": np.float32,
}
INPUTS = ("images", "input_ids", "attention_mask")
MODE_TARGETS = {"hidden": "target_features", "action": "target_logprobs"}
META_KEYS = ("format_version", "num_anchors", "hidden_dim", "dtype", "shapes")
MODE_META_KEYS = {"hidden": ("hidden_layer", "pooling"), "action": ()}
LARGE_ANCHOR_BATCH = 64
HELDOUT_DIR = "heldout"
FINITE_CHECK_ROWS = 4096  # rows of target_features checked per read when a cache is opened


class AnchorCacheError(CraftConfigError):
    """The anchor cache folder is missing, incomplete or corrupt."""


class AnchorCacheWriter:
    """Fills the arrays row by row into a temporary folder; `close()` publishes it atomically."""

    def __init__(self, out_dir: Path, shapes: Dict[str, tuple], overwrite: bool = False):
        """`shapes`: {array name: shape}, every shape starting with the number of anchors."""
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"anchor cache output {self.out_dir} already exists and is not empty; "
                "choose another --output_dir or pass --overwrite true"
            )
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.arrays = {
            name: np.lib.format.open_memmap(self.tmp_dir / f"{name}.npy", mode="w+", dtype=ARRAYS[name],
                                            shape=shape)
            for name, shape in shapes.items()
        }
        self.num_anchors, self.filled = shapes["images"][0], 0
        self.instructions: List[str] = []
        self.episode_ids: List[str] = []

    def append(self, rows: Dict[str, np.ndarray], instructions: List[str],
               episode_ids: Optional[List[str]] = None) -> None:
        n = len(instructions)
        if self.filled + n > self.num_anchors:
            raise ValueError(f"anchor cache holds {self.num_anchors} anchors; got {self.filled + n}")
        for name in self.arrays.keys() & set(MODE_TARGETS.values()):
            bad = first_nonfinite_row(np.asarray(rows[name]))
            if bad is not None:
                self.discard()
                raise AnchorCacheError(
                    f"anchor cache {self.out_dir}: the model produced a non-finite target (NaN or inf) for anchor "
                    f"{self.filled + bad} (row {self.filled + bad} of {name}.npy, instruction {instructions[bad]!r}); "
                    "nothing was written. Check the model weights and the compute dtype"
                )
        for name, arr in self.arrays.items():
            arr[self.filled : self.filled + n] = rows[name]
        self.instructions.extend(instructions)
        self.episode_ids.extend(episode_ids or [])
        self.filled += n

    def discard(self) -> None:
        """Drops the unfinished cache; the output folder is left as it was."""
        self.arrays.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def close(self, meta: dict) -> Path:
        if self.filled != self.num_anchors:
            raise ValueError(f"anchor cache expects {self.num_anchors} anchors; only {self.filled} written")
        for arr in self.arrays.values():
            arr.flush()
        meta = {
            "format_version": FORMAT_VERSION,
            "num_anchors": self.num_anchors,
            "shapes": {name: list(arr.shape) for name, arr in self.arrays.items()},
            **meta,
        }
        missing = [k for k in META_KEYS + MODE_META_KEYS[meta.get("retention_mode", "hidden")] if k not in meta]
        if missing:
            raise ValueError(f"anchor cache meta is missing {missing}")
        (self.tmp_dir / "instructions.json").write_text(json.dumps(self.instructions, indent=0))
        if self.episode_ids:
            if len(self.episode_ids) != self.num_anchors:
                raise ValueError(f"anchor cache got {len(self.episode_ids)} episode ids for {self.num_anchors} anchors")
            (self.tmp_dir / "episodes.json").write_text(json.dumps(self.episode_ids, indent=0))
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

    @property
    def mode(self) -> str:
        return self.meta.get("retention_mode", "hidden")

    @classmethod
    def open(cls, path: Path) -> "AnchorCache":
        path = Path(path)
        meta = read_meta(path)
        target = MODE_TARGETS[meta.get("retention_mode", "hidden")]
        names = [*INPUTS, target, *(["actions"] if "actions" in meta["shapes"] else [])]
        arrays = {}
        for name in names:
            dtype = ARRAYS[name]
            f = path / f"{name}.npy"
            if name not in meta["shapes"]:
                raise AnchorCacheError(f"anchor cache {path / 'meta.json'} lists no shape for {f.name}")
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
        width = d * len(meta.get("hidden_layers") or [None])
        if {a.shape[0] for a in arrays.values()} != {n} or (
                target == "target_features" and arrays[target].shape[1] != width):
            raise AnchorCacheError(
                f"anchor cache {path}: arrays disagree with meta.json (num_anchors={n}, hidden_dim={d}); "
                f"found shapes { {k: a.shape for k, a in arrays.items()} }"
            )
        bad = first_nonfinite_row(arrays[target].reshape(n, -1))
        if bad is not None:
            raise AnchorCacheError(
                f"anchor cache file {path / (target + '.npy')} holds a non-finite value (NaN or inf) in row "
                f"{bad}; every drift against it would be NaN: rebuild the cache"
            )
        return cls(path=path, meta=meta, arrays=arrays)

    def heldout(self) -> Optional["AnchorCache"]:
        """The held-out anchors, or None for a cache built without them (see `heldout_note`)."""
        if "heldout" not in self.meta:
            return None
        return AnchorCache.open(self.path / HELDOUT_DIR)

    @property
    def heldout_note(self) -> Optional[str]:
        """Why held-out drift cannot be measured, for the caller to print; None when it can."""
        if "heldout" in self.meta:
            return None
        return (f"the anchor cache {self.path} has no held-out anchors (built before they existed, or without "
                "them): held-out drift metrics are not computed; rebuild the cache to get them")

    def episode_ids(self) -> Optional[List[str]]:
        """The episode of each anchor, when the cache recorded it."""
        f = self.path / "episodes.json"
        return json.loads(f.read_text()) if f.is_file() else None

    def batch(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows `indices` of every array, copied out of the memory map."""
        order = np.argsort(indices)  # sorted reads are sequential on disk
        rows = {name: arr[np.asarray(indices)[order]] for name, arr in self.arrays.items()}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {name: r[inverse] for name, r in rows.items()}


def first_nonfinite_row(features: np.ndarray) -> Optional[int]:
    """Index of the first row holding NaN or inf, read in blocks so a large memory map is never loaded whole."""
    for start in range(0, features.shape[0], FINITE_CHECK_ROWS):
        finite = np.isfinite(features[start : start + FINITE_CHECK_ROWS]).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


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
    mode = meta.get("retention_mode", "hidden")
    if mode not in MODE_TARGETS:
        raise AnchorCacheError(f"anchor cache {meta_file} has retention_mode {mode!r}; this version reads "
                               f"{list(MODE_TARGETS)}")
    missing = [k for k in META_KEYS + MODE_META_KEYS[mode] if k not in meta]
    if missing:
        raise AnchorCacheError(f"anchor cache {meta_file} lacks the keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise AnchorCacheError(
            f"anchor cache {meta_file} has format_version {meta['format_version']}; this version reads "
            f"{FORMAT_VERSION}: rebuild it with vla-scripts/build_anchor_cache.py"
        )
    return meta


def check_cache_matches(meta: dict, *, retention_mode: str, layers: Tuple[int, ...], pooling: str, dtype: str,
                        hidden_dim: int, anchor_batch_size: int, cache_dir: Optional[Path] = None,
                        dtype_flag: Optional[str] = None, model_flag: Optional[str] = None,
                        needs_actions: Optional[str] = None) -> None:
    """The guide's checklist: the cache must hold the targets this run will compute.

    `dtype_flag` and `model_flag` name the caller's settings that chose the compute dtype and the model, so
    the message can point at them; `needs_actions` names the flag that reads the anchors' recorded actions."""
    where = f"the anchor cache {cache_dir}" if cache_dir else "the anchor cache"
    cached_mode = meta.get("retention_mode", "hidden")
    if retention_mode != cached_mode:
        raise CraftConfigError(
            f"--craft.retention_mode is {retention_mode!r} but {where} was built for {cached_mode!r}: pass "
            f"--craft.retention_mode {cached_mode} or build a cache with vla-scripts/build_anchor_cache.py "
            f"--retention_mode {retention_mode}"
        )
    if retention_mode == "hidden":
        cached_layers = tuple(meta.get("hidden_layers") or (meta["hidden_layer"],))
        for flag, found, cached in (("--craft.hidden_layers" if len(layers) > 1 or len(cached_layers) > 1
                                     else "--craft.hidden_layer", layers, cached_layers),
                                    ("--craft.pooling", pooling, meta["pooling"])):
            if found != cached:
                value = cached if isinstance(cached, str) else (
                    f"'[{','.join(map(str, cached))}]'" if len(cached) > 1 else cached[0])
                raise CraftConfigError(
                    f"{flag} is {_show(found)} but {where} was built with {_show(cached)}: pass {flag} {value} "
                    "or rebuild the cache with the new value"
                )
    if dtype != meta["dtype"]:
        raise CraftConfigError(
            f"training computes in {dtype}{_named(dtype_flag)} but {where} holds targets computed in "
            f"{meta['dtype']}; rebuild the cache with --dtype {dtype}, or compute in {meta['dtype']} ("
            f"--vla.enable_mixed_precision_training {'true' if meta['dtype'] == 'bfloat16' else 'false'})"
        )
    if hidden_dim != meta["hidden_dim"]:
        raise CraftConfigError(
            f"{where} holds targets of a model with hidden size {meta['hidden_dim']} but the model's hidden size "
            f"is {hidden_dim}{_named(model_flag)}: build the cache from this model"
        )
    if needs_actions and "actions" not in meta["shapes"]:
        raise CraftConfigError(
            f"{needs_actions} reads the anchors' recorded actions, which {where} does not hold (built before it "
            "stored them): rebuild it with vla-scripts/build_anchor_cache.py"
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


def _show(value) -> str:
    """A flag's value as a message shows it: one layer as a number, several as a list."""
    if isinstance(value, tuple):
        return repr(value[0]) if len(value) == 1 else repr(list(value))
    return repr(value)


def _named(flag: Optional[str]) -> str:
    return f" ({flag})" if flag else ""


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
