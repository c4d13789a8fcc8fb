"""Resume after a crash: same metrics as an uninterrupted run; a crash mid-save keeps the previous checkpoint."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch import ROOT, child_env, torchrun, user_flags

from prismatic.training.checkpointing import complete_checkpoints, resolve_resume

COMPARED = ("L_act", "L_ret", "lambda", "epsilon", "grad_dot", "grad_cos", "projection", "grad_norm", "learning_rate")


def launch(args: list) -> subprocess.Popen:
    return subprocess.Popen(torchrun(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=child_env(), start_new_session=True)


def rows(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def flags(demo, root, run_id, **extra):
    return user_flags(demo, root, **{"run_id": run_id, "vla.per_device_batch_size": 4, "vla.max_steps": 8,
                                     "save_interval": 3, "keep_last_checkpoints": 2, "vla.lr_scheduler_type":
                                     "linear-warmup+cosine-decay", "vla.warmup_ratio": 0.25, **extra})


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(demo, tmp_path):
    reference = launch(flags(demo, tmp_path, "ref"))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]

    victim = launch(flags(demo, tmp_path, "crash"))
    deadline = time.time() + 300
    while len(rows(tmp_path / "crash")) < 5 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and its worker, mid-training
    victim.wait()
    assert complete_checkpoints(tmp_path / "crash"), "a checkpoint at step 3 should exist"

    resumed = launch(flags(demo, tmp_path, "crash", resume_from="latest"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]

    ref, got = rows(tmp_path / "ref"), rows(tmp_path / "crash")
    assert [r["step"] for r in got] == list(range(1, 9))  # rows logged after the checkpoint were set aside
    for a, b in zip(ref, got):
        for key in COMPARED:
            assert b[key] == a[key], (a["step"], key, a[key], b[key])
    assert [p.name for p in complete_checkpoints(tmp_path / "crash")] == ["step-000006", "step-000008"]


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    good = run / "checkpoints" / "step-000003"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"step": 3}))
    half = run / "checkpoints" / "step-000006.partial"  # what a kill during the next save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"truncated")
    assert resolve_resume("latest", run) == good
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        resolve_resume(str(half), run)
