"""train_craft.py under several processes: two "nodes" on one machine, and a rank that dies."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from launch import ROOT, child_env, run_cut_at, run_script, superseded_steps, torchrun, user_flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


COMMON = {"vla.per_device_batch_size": 4, "save_interval": 2, "vla.max_steps": 4}


@pytest.fixture(scope="module")
def two_rank_run(demo, tmp_path_factory) -> Path:
    """A 4-step run on two ranks, checkpointed at steps 2 and 4."""
    root = tmp_path_factory.mktemp("two_ranks")
    res = run_script(user_flags(demo, root, **COMMON), nproc=2)
    assert res.returncode == 0, res.stderr[-4000:]
    return root / "run"


def test_two_ranks_train_and_checkpoint(two_rank_run):
    rows = _rows(two_rank_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 logs once per step
    assert rows[-1]["samples_per_s"] > 0 and rows[-1]["lambda"] is not None
    ckpt = two_rank_run / "checkpoints" / "step-000004"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-0.pt", "rank-1.pt"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2


def test_two_nodes_with_one_process_each_train_with_hybrid_sharding(demo, tmp_path):
    port = _free_port()
    args = user_flags(demo, tmp_path, **{"vla.max_steps": 2, "vla.per_device_batch_size": 4,
                                         "sharding_strategy": "hybrid-shard"})
    nodes = [
        subprocess.Popen(torchrun(args, 1, ("--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                                            "--master-port", str(port))),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env())
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2]


def _worker_pid(marker: str, rank: int) -> int:
    """The training process of `rank` among those whose command line mentions `marker`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and "train_craft.py" in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} found")


def test_a_rank_that_dies_ends_the_job_instead_of_hanging(demo, tmp_path):
    args = user_flags(demo, tmp_path, **{"vla.max_steps": 1000, "vla.per_device_batch_size": 4,
                                         "dist_timeout_s": 60})
    job = subprocess.Popen(torchrun(args, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=child_env(), start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(_rows(tmp_path / "run")) < 2 and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert job.poll() is None, "the job ended before the fault was injected"
        os.kill(_worker_pid(str(tmp_path), rank=1), signal.SIGKILL)
        t0 = time.time()
        job.communicate(timeout=180)
        assert job.returncode != 0
        assert time.time() - t0 < 180
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def test_two_rank_run_resumes_exactly(demo, two_rank_run, tmp_path):
    run_cut_at(two_rank_run, 2, tmp_path / "run")
    resumed = run_script(user_flags(demo, tmp_path, **{**COMMON, "resume_from": "latest"}), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _rows(two_rank_run), _rows(tmp_path / "run")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and superseded_steps(tmp_path / "run") == [3, 4]
    for x, y in zip(a, b):
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "projection", "grad_norm"):
            assert x[key] == y[key], (x["step"], key)
