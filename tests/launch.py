"""Launching train_craft.py as users do (torchrun), on the demo assets of conftest.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPS, LAMBDA_LR = 0.001, 50.0


def user_flags(demo: Path, run_root: Path, **overrides) -> list:
    """The user's flags on the demo assets, in float32 like the demo's anchor cache (the fast dtype on CPUs)."""
    flags = {
        "pretrained_checkpoint": demo / "model", "data_root_dir": demo / "rlds", "vla.data_mix": "libero_90",
        "craft.enabled": "true", "craft.retention_mode": "hidden", "craft.anchor_cache_dir": demo / "anchor_cache",
        "craft.pooling": "mean_image_tokens", "craft.hidden_layer": -2, "craft.retention_loss_type": "mse",
        "craft.epsilon": EPS, "craft.lambda_lr": LAMBDA_LR, "craft.anchor_batch_size": 4,
        "vla.per_device_batch_size": 8, "vla.learning_rate": 1e-3, "vla.shuffle_buffer_size": 500,
        "vla.enable_mixed_precision_training": "false",
        "run_root_dir": run_root, "run_id": "run", **overrides,
    }
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def error_line(res: subprocess.CompletedProcess) -> str:
    """The program's one error line, which must also be the last line of torchrun's report (torchrun exits 1)."""
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("train_craft.py: error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    last = [line for line in res.stderr.splitlines() if line.strip(" =")][-1]
    assert last.strip().endswith(lines[0]), res.stderr[-3000:]
    return lines[0]


def torchrun(args: list, nproc: int = 1, rendezvous=("--standalone", "--nnodes", "1")) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc),
            str(ROOT / "vla-scripts" / "train_craft.py"), *args]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(args: list, nproc: int = 1, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(args, nproc), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=child_env())


def run_cut_at(run_dir: Path, step: int, dest: Path) -> Path:
    """`run_dir` as a crash right after its step-`step` checkpoint leaves it: the logs (rows past that step
    included), config and statistics, and that checkpoint only. Resuming it must reproduce the rest of the run."""
    dest.mkdir(parents=True)
    for path in run_dir.iterdir():
        if path.is_file():
            shutil.copy(path, dest / path.name)
    name = f"step-{step:06d}"
    shutil.copytree(run_dir / "checkpoints" / name, dest / "checkpoints" / name)
    return dest


def superseded_steps(run_dir: Path) -> list:
    """The steps of the metrics rows a resume set aside (those past its checkpoint, redone by the resumed run)."""
    return [json.loads(line)["step"] for path in sorted(run_dir.glob("metrics.superseded-*.jsonl"))
            for line in path.read_text().splitlines()]
