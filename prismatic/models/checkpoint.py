"""Checkpoints in the Hugging Face layout of openvla/openvla-7b: config.json, safetensors shards, tokenizer files.

On disk, timm's LayerScale parameters are named `ls{1,2}.scale_factor` (the HF export renames `gamma`, which old
transformers versions rewrite to `weight` while loading); in memory they keep timm's `gamma`. Saving goes
through a temporary folder renamed at the end, so an interrupted save never leaves a half-written checkpoint.
Loading first checks every weight file's size against its safetensors header (a copy cut short fails at once,
naming the file), then builds the model on the meta device and assigns the tensors shard by shard, each cast as
it is read, so peak memory is one model copy plus one tensor as stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from prismatic.models.config import CONFIG_NAME, STATS_NAME, VLAModelConfig, read_config
from prismatic.models.processor import PREPROCESSOR_NAME, ImageProcessor
from prismatic.models.tokenizer import load_tokenizer
from prismatic.models.vla import OpenVLA

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# Files of a released checkpoint that this writer does not produce but OpenVLA's own loaders read: the HF
# remote code, the processor and generation configs, and the tokenizer files transformers 5 no longer writes.
CARRIED_FILES = (
    "configuration_prismatic.py",
    "modeling_prismatic.py",
    "processing_prismatic.py",
    PREPROCESSOR_NAME,
    "generation_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
    *TOKENIZER_FILES,
)
# Hugging Face's "7GB" (decimal), as in OpenVLA's export: a bfloat16 7B model lands in the published 3 shards.
DEFAULT_MAX_SHARD_BYTES = 7 * 10**9
# A safetensors file: an 8-byte little-endian header length, the JSON header, then the tensor data.
SAFETENSORS_PREFIX_BYTES = 8


class CheckpointFileError(ValueError):
    """A checkpoint file that is damaged or does not match what loading it needs."""


def to_disk_name(key: str) -> str:
    return re.sub(r"\.(ls[12])\.gamma$", r".\1.scale_factor", key)


def from_disk_name(key: str) -> str:
    return re.sub(r"\.(ls[12])\.scale_factor$", r".\1.gamma", key)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_json(path: Path, obj: Any, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def _plan_shards(sizes: dict[str, int], max_shard_size_bytes: int) -> list[list[str]]:
    """Greedy, in state-dict order: start a new shard when the next tensor would overflow the current one."""
    shards: list[list[str]] = [[]]
    current = 0
    for key, size in sizes.items():
        if shards[-1] and current + size > max_shard_size_bytes:
            shards.append([])
            current = 0
        shards[-1].append(key)
        current += size
    return shards


def _write_weights(state_dict: dict, folder: Path, max_shard_size_bytes: int, dtype: torch.dtype | None) -> str:
    """Write the safetensors file(s) (+ index when sharded); return the saved floating dtype's name."""
    state = {to_disk_name(k): v for k, v in state_dict.items()}
    cast = {k: dtype if dtype is not None and v.is_floating_point() else v.dtype for k, v in state.items()}
    sizes = {k: v.numel() * cast[k].itemsize for k, v in state.items()}
    shards = _plan_shards(sizes, max_shard_size_bytes)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for name, keys in zip(names, shards):
        tensors = {k: state[k].detach().to(device="cpu", dtype=cast[k]).contiguous() for k in keys}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        _write_json(folder / INDEX_NAME, index, sort_keys=True)
    floating = [d for d in cast.values() if d.is_floating_point]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def _carry_files(source_dir: Path, folder: Path) -> None:
    """Copy the `CARRIED_FILES` of the source checkpoint that the save did not write itself."""
    for name in CARRIED_FILES:
        if (source_dir / name).is_file() and not (folder / name).exists():
            shutil.copy2(source_dir / name, folder / name)


def save_pretrained(
    model: OpenVLA,
    out_dir: str | Path,
    tokenizer=None,
    dataset_statistics: dict | None = None,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    source_dir: str | Path | None = None,
    state_dict: dict | None = None,
    processor: ImageProcessor | None = None,
) -> Path:
    """Write a checkpoint folder in the openvla-7b layout.

    `dataset_statistics` (default: the config's `norm_stats`) go both into config.json and dataset_statistics.json.
    `dtype` casts floating weights (torch.bfloat16 as published). `source_dir`, the checkpoint the model was loaded
    from, contributes its `CARRIED_FILES`, so the result also loads with OpenVLA's own (remote-code) classes.
    `state_dict` replaces `model.state_dict()`, e.g. the full weights gathered from a sharded (FSDP) model.
    `processor` is written as preprocessor_config.json; by default the source checkpoint's file is carried
    unchanged, or, without one, the model's own `image_processor` is written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config = model.config.to_dict()
        if dataset_statistics is not None:
            config["norm_stats"] = dataset_statistics
        config["transformers_version"] = transformers.__version__  # as Hugging Face's save_pretrained writes
        if config["norm_stats"] is not None:
            _write_json(tmp / STATS_NAME, config["norm_stats"])
        weights = model.state_dict() if state_dict is None else state_dict
        config["torch_dtype"] = _write_weights(weights, tmp, max_shard_size_bytes, dtype)
        _write_json(tmp / CONFIG_NAME, config, sort_keys=True)
        if processor is not None:
            processor.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source_dir is not None:
            _carry_files(Path(source_dir), tmp)
        if not (tmp / PREPROCESSOR_NAME).is_file():
            model.image_processor.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists weight shards that are missing from {folder}: {missing}")
        return [folder / n for n in names]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHTS_NAME} or {INDEX_NAME}; found {found}")


def check_safetensors_file(path: Path) -> None:
    """Raise CheckpointFileError unless `path` is as long as its own header says: catches a truncated download
    or copy before any tensor is read."""
    size = path.stat().st_size
    damaged = f"{path} is damaged or truncated"
    if size < SAFETENSORS_PREFIX_BYTES:
        raise CheckpointFileError(f"{damaged}: {size} bytes, shorter than the 8-byte safetensors header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(SAFETENSORS_PREFIX_BYTES), "little")
        if header_len > size - SAFETENSORS_PREFIX_BYTES:
            raise CheckpointFileError(
                f"{damaged}: its safetensors header announces {header_len} bytes of header, but only "
                f"{size - SAFETENSORS_PREFIX_BYTES} bytes follow"
            )
        try:
            header = json.loads(f.read(header_len))
            data_bytes = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointFileError(f"{damaged}: its safetensors header is unreadable ({e})") from None
    found = size - SAFETENSORS_PREFIX_BYTES - header_len
    if found != data_bytes:
        raise CheckpointFileError(
            f"{damaged}: expected {data_bytes} bytes of tensor data per its header, found {found}"
        )


def check_weight_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, each checked against its header; cheap enough for a preflight."""
    files = _weight_files(Path(path))
    for f in files:
        check_safetensors_file(f)
    return files


def _check_keys(expected: set[str], files: list[Path]) -> None:
    found: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as reader:
            found.update(from_disk_name(k) for k in reader.keys())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointFileError(
            f"checkpoint weights do not match the model built from config.json: "
            f"{len(missing)} missing {missing[:20]}, {len(unexpected)} unexpected {unexpected[:20]}"
        )


def rebuild_rotary(model: OpenVLA, device: torch.device) -> None:
    """RoPE frequencies are a non-persistent buffer (not in the checkpoint): recompute them on `device`."""
    llm = model.language_model.model
    with torch.device(device):
        llm.rotary_emb = type(llm.rotary_emb)(config=llm.config)


def _read_shard(path: Path, dtype: torch.dtype, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(in-memory name, tensor) one at a time: each stored tensor is dropped as soon as it is cast."""
    with safe_open(str(path), framework="pt", device=str(device)) as reader:
        for key in reader.keys():
            tensor = reader.get_tensor(key)
            yield from_disk_name(key), tensor.to(dtype) if tensor.is_floating_point() else tensor


def read_weights(path: str | Path, expected_keys: set[str], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(in-memory name, tensor) of every weight of a checkpoint folder, one tensor at a time. The files' sizes and
    keys are checked now, by the call, before any tensor is read."""
    files = check_weight_files(path)
    _check_keys(expected_keys, files)
    return (item for f in files for item in _read_shard(f, dtype, torch.device(device)))


def read_tokenizer(path: str | Path):
    """The folder's tokenizer, or None if it has none."""
    folder = Path(path)
    return load_tokenizer(folder) if any((folder / name).is_file() for name in TOKENIZER_FILES) else None


def load_pretrained(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[OpenVLA, Any, VLAModelConfig]:
    """(model in eval mode, tokenizer or None if the folder has none, config) from a checkpoint folder.

    Floating weights are cast to `dtype`; the model is built on the meta device and each tensor is assigned as it
    is read, so peak host memory is about one model copy. `model.image_processor` is the folder's own
    (preprocessor_config.json), so predictions normalise images as the checkpoint prescribes.
    """
    config = read_config(path)
    processor = ImageProcessor.from_pretrained(path, config)
    device = torch.device(device)
    with torch.device("meta"):
        model = OpenVLA.from_config(config)
    model.image_processor = processor
    weights = read_weights(path, set(model.state_dict()), dtype, device)
    for name, tensor in weights:
        model.load_state_dict({name: tensor}, strict=False, assign=True)
    rebuild_rotary(model, device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors left unmaterialised after loading {path}: {still_meta}")
    return model.eval(), read_tokenizer(path), config
