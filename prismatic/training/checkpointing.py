"""Checkpoints that resume exactly, written so that a crash mid-save never costs the previous one.

`<run_dir>/checkpoints/step-NNNNNN/` is an OpenVLA checkpoint folder (config.json, safetensors,
tokenizer, dataset_statistics.json: it loads wherever OpenVLA checkpoints load; with LoRA, the base
and adapters merged, unless merge_on_save is off) plus `adapter_model.safetensors` with LoRA, plus
what resuming needs: `trainer_state.json` (step, CRaFT dual state, data position), `train_config.json`
(every flag of the run, compared with the flags of a resume before any work), `optimizer/` (sharded
optimizer state), `scheduler.pt`, `rng/rank-R.pt`. Everything is written into `step-NNNNNN.partial/`
and renamed at the end; `latest` is the newest folder without that suffix, and older checkpoints are deleted only
once the new one is complete. `checkpoint_bytes` says what one checkpoint takes, so that the pre-flight checks can
refuse a run whose disk cannot hold its checkpoints; a save that still meets a full disk removes its partial
folder and stops with one line.
"""

import errno
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from safetensors.torch import load_file, save_file

from prismatic.conf.train import RESUME_RETUNABLE, flag_changes, resume_breaking_changes
from prismatic.models import save_pretrained
from prismatic.models.checkpoint import CARRIED_FILES, CONFIG_NAME as MODEL_CONFIG_FILE
from prismatic.models.lora import LORA_MARKER, adapter_state_dict, merged_state_dict
from prismatic.training.distributed import DistEnv

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
PARTIAL = ".partial"
# Measured on the demo's checkpoints: safetensors headers take ~120 bytes per tensor; the optimizer's DCP files
# 2-6 KiB per parameter beyond its moments (three tensors' metadata and torch.save framing).
BYTES_PER_TENSOR = 2**10
OPTIMIZER_BYTES_PER_PARAMETER = 2**13
SMALL_FILES_BYTES = 2**16  # trainer state, flags, scheduler, dataset statistics: a few KiB each
RNG_BYTES_PER_RANK = 2**15  # rng/rank-R.pt: ~18 KiB


class CheckpointSpaceError(OSError):
    """A save met a full disk; the message names the folder, the bytes needed and free, and the last good
    checkpoint."""


def save_due(steps_done: int, end: int, interval: int) -> bool:
    """Whether a checkpoint is written after `steps_done` steps: every `interval` (--save_interval) and at `end`."""
    return steps_done % interval == 0 or steps_done == end


def checkpoint_bytes(model, *, lora_scaling: Optional[float], merge_lora: bool, source_dir: Optional[Path],
                     world_size: int) -> Dict[str, int]:
    """What `save_checkpoint` writes for `model` as set up for training (it may live on the meta device), by part:
    the OpenVLA-layout weights in float32 (the fp32 masters, or the LoRA merge), the adapters, AdamW's two moments
    of every trainable parameter, and the small files (those carried from `source_dir`, state, RNG). An upper
    bound by a few per cent: a parameter that never receives a gradient gets no optimizer state."""
    def stored(tensors) -> int:
        return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) + BYTES_PER_TENSOR for t in tensors)

    state = model.state_dict()
    lora = lora_scaling is not None
    layout = not lora or merge_lora  # the OpenVLA layout (weights, config, tokenizer, carried files) is written
    carried = [Path(source_dir) / name for name in (MODEL_CONFIG_FILE, *CARRIED_FILES)] if source_dir and layout else []
    return {
        "weights": stored(v for k, v in state.items() if LORA_MARKER not in k) if layout else 0,
        "adapters": stored(adapter_state_dict(state).values()) if lora else 0,
        "optimizer state": sum(2 * p.numel() * p.element_size() + OPTIMIZER_BYTES_PER_PARAMETER
                               for p in model.parameters() if p.requires_grad),
        "other files": sum(f.stat().st_size for f in carried if f.is_file()) + SMALL_FILES_BYTES
        + RNG_BYTES_PER_RANK * world_size,
    }


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def describe_bytes(parts: Dict[str, int]) -> str:
    """"53.2 MB (weights 17.8 MB + optimizer state 35.6 MB + ...)": a checkpoint's size and what it is made of."""
    return f"{human_bytes(sum(parts.values()))} (" + " + ".join(
        f"{name} {human_bytes(n)}" for name, n in parts.items() if n) + ")"


def _disk_full(error: BaseException) -> bool:
    """Whether `error` is, or wraps, ENOSPC: DCP gathers each rank's failure into a CheckpointException, and
    safetensors reports the OS error in its own exception's text."""
    pending = [error]
    while pending:
        e = pending.pop()
        if e.errno == errno.ENOSPC if isinstance(e, OSError) else os.strerror(errno.ENOSPC) in str(e):
            return True
        if isinstance(e, CheckpointException):
            pending += [failure for failure, _ in e.failures.values()]
        pending += [x for x in (e.__cause__, e.__context__) if x is not None]
    return False


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Finished checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL)
             and (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume_from: str, run_dir: Path) -> Path:
    """`latest` -> the run's newest finished checkpoint; a path -> that checkpoint, checked."""
    if resume_from == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from latest: no finished checkpoint under {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from {path}: expected a checkpoint folder holding {STATE_FILE}; "
                                f"found {'no such folder' if not path.is_dir() else sorted(x.name for x in path.iterdir())}")
    return path


def check_resume_matches(path: Path, config: dict, world_size: int) -> Tuple[List[str], List[dict]]:
    """Reads only two small files: stops, naming every flag whose change breaks exact resume (or, with
    --resume_with_changes, every change it cannot honour); else returns notes on what could not be checked or
    changes in meaning, and the changed flags as {"flag", "old", "new"}."""
    state = json.loads((path / STATE_FILE).read_text())
    changes = [] if state["world_size"] == world_size else \
        [f"world size (torchrun processes) {state['world_size']} -> {world_size}"]
    saved_file = path / CONFIG_FILE
    if not saved_file.is_file():
        if changes:
            raise ValueError(f"--resume_from {path}: exact resume needs the same launch; changed: {changes[0]}")
        return [f"{path} holds no {CONFIG_FILE} (an older checkpoint): the flags were not compared with it"], []
    saved = json.loads(saved_file.read_text())
    retuning = bool(config.get("resume_with_changes"))
    changes += resume_breaking_changes(saved, config, retuning)
    changed = [{"flag": f"--{flag}", "old": old, "new": new} for flag, old, new in flag_changes(saved, config)]
    if changes:
        retunable = [c["flag"] for c in changed if c["flag"][2:] in RESUME_RETUNABLE and not retuning]
        raise ValueError(f"--resume_from {path}: exact resume needs the flags the run was started with; changed: "
                         f"{'; '.join(changes)}. Launch with the values in {saved_file}, or start a new run "
                         "(another --run_id)" + (f"; --resume_with_changes true accepts {', '.join(retunable)} "
                                                 "(optimizer state, lambda and data position carry over)"
                                                 if retunable else ""))
    notes = []
    old_steps, new_steps = saved["vla"]["max_steps"], config["vla"]["max_steps"]
    if old_steps != new_steps and (config["vla"]["lr_scheduler_type"] != "constant"
                                   or config["craft"]["epsilon_schedule"] != "constant"):
        notes.append(f"--vla.max_steps {old_steps} -> {new_steps}: the learning-rate / epsilon schedules "
                     "stretch to the new length from here on")
    notes += [f"resumed with {c['flag']} {c['old']} -> {c['new']}" for c in changed]
    return notes, changed


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file: a full disk then raises OSError(ENOSPC), not torch's errno-less
    RuntimeError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _write_weights(folder: Path, weights: dict, *, model, tokenizer, dataset_statistics: dict,
                   lora_scaling: Optional[float], merge_lora: bool, source_dir: Optional[Path]) -> None:
    """The model in the OpenVLA layout (merged when LoRA) and, with LoRA, the adapters alone."""
    if lora_scaling is None or merge_lora:
        # The merge is computed and written in float32, like the full fine-tuning checkpoints (fp32 masters).
        merged = weights if lora_scaling is None else merged_state_dict(weights, lora_scaling, dtype=torch.float32)
        save_pretrained(model, folder, tokenizer=tokenizer, dataset_statistics=dataset_statistics, state_dict=merged,
                        source_dir=source_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if lora_scaling is not None:
        adapters = {k: v.contiguous() for k, v in adapter_state_dict(weights).items()}
        save_file(adapters, str(folder / ADAPTER_FILE), metadata={"format": "pt", "lora_scaling": str(lora_scaling)})


def load_adapters(model, path: Path) -> None:
    """Adapter weights saved by a LoRA run into a model that already has the same adapters."""
    adapters = load_file(str(Path(path) / ADAPTER_FILE))
    missing = set(adapter_state_dict(model.state_dict())) - set(adapters)
    if missing or set(adapters) - set(model.state_dict()):
        raise ValueError(f"{Path(path) / ADAPTER_FILE} does not match the model's adapters (check --vla.lora_rank "
                         f"and --vla.lora_target_modules); e.g. missing {sorted(missing)[:3]}")
    model.load_state_dict(adapters, strict=False)


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, dataset_statistics: dict, optimizer, scheduler,
                    trainer_state: dict, train_config: dict, env: DistEnv, keep_last: Optional[int],
                    lora_scaling: Optional[float] = None, merge_lora: bool = True,
                    source_dir: Optional[Path] = None) -> Path:
    """Writes `step-NNNNNN.partial/`, renames it, then deletes the finished checkpoints beyond `keep_last`. On a
    full disk the partial folder is removed and CheckpointSpaceError says what the save needed."""
    final = checkpoint_path(run_dir, step)
    partial = final.with_name(final.name + PARTIAL)
    if env.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier save
    _barrier(env)
    try:
        _write_partial(partial, model=model, tokenizer=tokenizer, dataset_statistics=dataset_statistics,
                       optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state,
                       train_config=train_config, env=env, lora_scaling=lora_scaling, merge_lora=merge_lora,
                       source_dir=source_dir)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        if not _disk_full(e):
            raise
        if env.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        needed = checkpoint_bytes(model, lora_scaling=lora_scaling, merge_lora=merge_lora, source_dir=source_dir,
                                  world_size=env.world_size)
        good = complete_checkpoints(run_dir)
        raise CheckpointSpaceError(
            errno.ENOSPC,
            f"no space left on the device of {final.parent} while saving {final.name}: a checkpoint needs about "
            f"{describe_bytes(needed)}, {human_bytes(shutil.disk_usage(final.parent).free)} are free; the partial "
            f"folder was removed and the last good checkpoint, {good[-1] if good else 'none yet'}, is untouched. "
            "Free space (or move --run_root_dir to a larger disk), then continue with --resume_from latest",
        ) from None
    if env.is_main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if keep_last:  # only now that the new checkpoint is complete
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old)
    _barrier(env)
    return final


def _write_partial(partial: Path, *, model, tokenizer, dataset_statistics: dict, optimizer, scheduler,
                   trainer_state: dict, train_config: dict, env: DistEnv, lora_scaling: Optional[float],
                   merge_lora: bool, source_dir: Optional[Path]) -> None:
    """Every file of a checkpoint, into `partial`; all ranks take part."""
    if lora_scaling is not None and not merge_lora and not env.distributed:
        # Only the adapters are written; a quantized base has no plain state dict to gather anyway.
        weights = {k: v.detach().to("cpu", copy=True)
                   for k, v in adapter_state_dict(dict(model.named_parameters())).items()}
    else:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        _write_weights(partial, weights, model=model, tokenizer=tokenizer, dataset_statistics=dataset_statistics,
                       lora_scaling=lora_scaling, merge_lora=merge_lora, source_dir=source_dir)
    del weights
    _barrier(env)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(partial / "optimizer"),
                 no_dist=not env.distributed)
    (partial / "rng").mkdir(exist_ok=True)
    _torch_save(_rng_state(), partial / "rng" / f"rank-{env.rank}.pt")
    _barrier(env)
    if env.is_main:
        _torch_save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / STATE_FILE).write_text(json.dumps({**trainer_state, "world_size": env.world_size}, indent=2))
        (partial / CONFIG_FILE).write_text(json.dumps(train_config, indent=2))


def load_training_state(path: Path, *, model, optimizer, scheduler, env: DistEnv,
                        learning_rate: Optional[float] = None) -> dict:
    """Optimizer, scheduler and this rank's RNG streams; returns trainer_state.json. Weights load separately.
    A `learning_rate` other than the saved one (a resume with --resume_with_changes) becomes the groups' base
    rate, applied at the LR schedule's current position."""
    state = json.loads((path / STATE_FILE).read_text())  # its world size matched in the pre-flight checks
    holder = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    # Partial: parameters that never received a gradient (e.g. the unused last ViT block) have no saved state.
    dcp.load(holder, checkpoint_id=str(path / "optimizer"), no_dist=not env.distributed,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, optimizer, holder["optimizer"])
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if learning_rate is not None and any(base != learning_rate for base in scheduler.base_lrs):
        scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = learning_rate
        scheduler.last_epoch -= 1
        scheduler.step()  # recomputes every group's rate at the same position from the new base
    rng = torch.load(path / "rng" / f"rank-{env.rank}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
