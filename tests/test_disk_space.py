"""Checkpoints and disk space: the size of a checkpoint is known before it is written, a run whose checkpoints
cannot fit is refused in the pre-flight checks, and a save that still meets a full disk removes its partial
folder, leaves every earlier checkpoint as it was and stops with one line."""

import errno
import json
import os
import runpy
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from launch import ROOT, user_flags
from safetensors import SafetensorError

from prismatic.conf.cli import parse_flags
from prismatic.conf.train import TrainConfig
from prismatic.models import OpenVLA, build_tiny_tokenizer, preset_config, save_pretrained
from prismatic.models.config import read_config
from prismatic.models import checkpoint as model_checkpoint
from prismatic.models.lora import add_lora, lora_targets
from prismatic.training import checkpointing, preflight as preflight_module
from prismatic.training.checkpointing import (CheckpointSpaceError, checkpoint_bytes, complete_checkpoints,
                                              save_checkpoint)
from prismatic.training.distributed import DistEnv
from prismatic.training.optim import build_optimizer, build_scheduler
from prismatic.training.stages import apply_train_stage
from test_preflight import _cfg

STATS = {"libero_90_no_noops": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
Usage = namedtuple("Usage", "total used free")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The pretrained checkpoint a run starts from (its tokenizer and configs are carried into every save)."""
    torch.manual_seed(0)
    return save_pretrained(OpenVLA.from_config(preset_config("tiny")), tmp_path_factory.mktemp("src") / "model",
                           build_tiny_tokenizer(), STATS)


def _job(source, lora=False):
    """A tiny model as the trainer sets it up, after one optimizer step (so AdamW holds its moments)."""
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    if lora:
        model = add_lora(model, 4, 4, 0.0, lora_targets(model, "all-linear"))
    else:
        apply_train_stage(model, "vla-full-train")
    optimizer = build_optimizer(model, 1e-3, 0.0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer, build_scheduler(optimizer, "constant", 10, 0.0)


def _save(run_dir, step, model, optimizer, scheduler, source, keep_last=None, lora_scaling=None, merge_lora=True):
    return save_checkpoint(run_dir, step, model=model, tokenizer=build_tiny_tokenizer(), dataset_statistics=STATS,
                           optimizer=optimizer, scheduler=scheduler, trainer_state={"step": step, "craft": None},
                           train_config={"seed": 7}, env=DistEnv(), keep_last=keep_last, lora_scaling=lora_scaling,
                           merge_lora=merge_lora, source_dir=source)


@pytest.mark.parametrize("lora,merge", [(False, True), (True, True), (True, False)])
def test_the_estimate_is_the_checkpoint_written_within_a_few_per_cent(source, tmp_path, lora, merge):
    model, optimizer, scheduler = _job(source, lora)
    scaling = 1.0 if lora else None
    written = _save(tmp_path, 1, model, optimizer, scheduler, source, lora_scaling=scaling, merge_lora=merge)
    parts = checkpoint_bytes(model, lora_scaling=scaling, merge_lora=merge, source_dir=source, world_size=1)
    assert (parts["weights"] > 0) == merge and (parts["adapters"] > 0) == lora
    if not lora:  # by hand: 4 bytes per weight, two fp32 moments per trained value (framing aside)
        assert parts["weights"] == pytest.approx(4 * sum(p.numel() for p in model.parameters()), rel=0.01)
        assert parts["optimizer state"] == pytest.approx(8 * sum(p.numel() for p in model.parameters()), rel=0.05)
    assert folder_bytes(written / "optimizer") <= parts["optimizer state"]
    actual = folder_bytes(written)
    # 1 MiB: the framing the estimate allows for the many tiny adapter tensors
    assert actual <= sum(parts.values()) <= 1.05 * actual + 2**20, (parts, actual)


@pytest.fixture
def two_saves(source, tmp_path):
    """A run folder holding the step-2 checkpoint, and the model ready to save step 4."""
    model, optimizer, scheduler = _job(source)
    _save(tmp_path, 2, model, optimizer, scheduler, source)
    good = tmp_path / "checkpoints" / "step-000002"
    return tmp_path, (model, optimizer, scheduler), {f: f.stat().st_mtime_ns for f in good.rglob("*")}


def _full_disk_in_dcp(monkeypatch):
    """The optimizer files meet a full disk after half a file: DCP wraps the OSError in its CheckpointException."""
    def write_half_then_fail(transforms, stream, *args, **kwargs):
        stream.write(b"\0" * 1000)
        raise ENOSPC

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_half_then_fail)


def _full_disk_in_safetensors(monkeypatch):
    """The weights meet a full disk: safetensors reports the OS error in the text of its own exception."""
    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(model_checkpoint, "save_file", fail)


@pytest.mark.parametrize("full_disk", [_full_disk_in_dcp, _full_disk_in_safetensors])
def test_a_save_on_a_full_disk_removes_its_partial_folder_and_says_what_it_needs(two_saves, source, monkeypatch,
                                                                                 full_disk):
    run_dir, job, before = two_saves
    full_disk(monkeypatch)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 12_345_678, 12_345_678))
    with pytest.raises(CheckpointSpaceError) as err:
        _save(run_dir, 4, *job, source, keep_last=1)
    message = err.value.strerror
    needed = sum(checkpoint_bytes(job[0], lora_scaling=None, merge_lora=True, source_dir=source,
                                  world_size=1).values())
    assert "\n" not in message and err.value.errno == errno.ENOSPC
    assert f"{run_dir / 'checkpoints'} while saving step-000004" in message
    assert f"needs about {needed / 1e6:.1f} MB (weights" in message and "12.3 MB are free" in message
    assert f"the last good checkpoint, {run_dir / 'checkpoints' / 'step-000002'}, is untouched" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]  # no .partial, no tmp
    good = run_dir / "checkpoints" / "step-000002"
    assert {f: f.stat().st_mtime_ns for f in good.rglob("*")} == before


def test_another_failure_is_not_called_a_full_disk(two_saves, source, monkeypatch):
    run_dir, job, _ = two_saves

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "no")

    monkeypatch.setattr(dcp_filesystem, "_write_item", denied)
    with pytest.raises(BaseException) as err:
        _save(run_dir, 4, *job, source)
    assert not isinstance(err.value, CheckpointSpaceError) and "no" in str(err.value)


def test_old_checkpoints_are_deleted_only_once_the_new_one_is_complete(two_saves, source, monkeypatch):
    run_dir, job, _ = two_saves
    seen = []
    real_rmtree = checkpointing.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        new = run_dir / "checkpoints" / "step-000004"
        seen.append((Path(path).name, (new / "trainer_state.json").is_file() and (new / "optimizer").is_dir()))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    _save(run_dir, 4, *job, source, keep_last=1)
    assert ("step-000002", True) in seen and [p.name for p in complete_checkpoints(run_dir)] == ["step-000004"]


def _free(monkeypatch, free):
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def test_the_preflight_refuses_a_run_whose_checkpoints_cannot_fit(demo, tmp_path, monkeypatch):
    cfg = _cfg(demo, tmp_path, **{"vla.max_steps": 8, "save_interval": 2, "keep_last_checkpoints": 2})
    one = sum(preflight_module.planned_checkpoint_bytes(cfg, read_config(demo / "model"), demo / "model", 1).values())
    _free(monkeypatch, 3 * one - 1)  # 4 saves, 2 kept + 1 being written = 3 at once
    with pytest.raises(preflight_module.PreflightError) as err:
        preflight_module.preflight(cfg)
    message = str(err.value)
    assert message.startswith(f"--run_root_dir {tmp_path / 'runs'}: its filesystem has ")
    assert f"({3 * one - 1:,} bytes) free, the run's checkpoints need" in message and f"({3 * one:,} bytes)" in message
    assert "3 checkpoint(s) of" in message and "saves 4 time(s)" in message and "--keep_last_checkpoints" in message
    assert not (tmp_path / "runs").exists()

    _free(monkeypatch, 3 * one + 1)  # fits, with no room to spare: a note
    assert [n for n in preflight_module.preflight(cfg).notes if "the run's checkpoints will take" in n]
    _free(monkeypatch, 10 * one)
    assert not [n for n in preflight_module.preflight(cfg).notes if "checkpoints will take" in n]
    cfg.dry_run_batches = 2  # writes nothing, but tells what the full run would meet
    _free(monkeypatch, 3 * one - 1)
    notes = [n for n in preflight_module.preflight(cfg).notes if "checkpoints need" in n]
    assert notes == [f"without --dry_run_batches this run would stop: {message}"]


def test_a_launched_run_that_meets_a_full_disk_stops_with_one_line(demo, tmp_path, monkeypatch, capsys):
    """The whole program (in this process, so the disk can be filled by hand at the second save)."""
    real_write_item = dcp_filesystem._write_item

    def full_at_step_4(transforms, stream, *args, **kwargs):
        if "step-000004" in getattr(stream, "name", ""):
            raise ENOSPC
        return real_write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", full_at_step_4)
    flags = user_flags(demo, tmp_path, **{"vla.per_device_batch_size": 2, "vla.max_steps": 4, "save_interval": 2})
    monkeypatch.setattr(sys, "argv", ["train_craft.py", *flags])
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "vla-scripts" / "train_craft.py"), run_name="__main__")
    assert done.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith("train_craft.py: error: no space left on the device of ")
    assert "step-000004: a checkpoint needs about" in errors[-1] and "Traceback" not in "\n".join(errors)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    assert json.loads((checkpoints / "step-000002" / "trainer_state.json").read_text())["step"] == 2
    # The pre-flight's estimate against the checkpoint the trainer wrote
    cfg = parse_flags(TrainConfig, flags)
    estimate = sum(preflight_module.planned_checkpoint_bytes(cfg, read_config(demo / "model"), demo / "model",
                                                             1).values())
    assert 1.0 <= estimate / folder_bytes(checkpoints / "step-000002") <= 1.05
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in logged] == [1, 2, 3, 4]
