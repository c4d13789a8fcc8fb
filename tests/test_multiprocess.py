"""train_craft.py under several processes: two "nodes" on one machine, and a rank that dies."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from launch import ROOT, child_env, run_script, torchrun, user_flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_ranks_train_and_checkpoint(demo, tmp_path):
    res = run_script(user_flags(demo, tmp_path, **{"vla.max_steps": 3, "vla.per_device_batch_size": 4}), nproc=2)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 logs once per step
    assert rows[-1]["samples_per_s"] > 0 and rows[-1]["lambda"] is not None
    ckpt = tmp_path / "run" / "checkpoints" / "step-000003"
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


def test_two_rank_run_resumes_exactly(demo, tmp_path):
    common = {"vla.per_device_batch_size": 4, "save_interval": 2}
    ref = run_script(user_flags(demo, tmp_path, **{**common, "run_id": "ref", "vla.max_steps": 4}), nproc=2)
    assert ref.returncode == 0, ref.stderr[-4000:]
    first = run_script(user_flags(demo, tmp_path, **{**common, "run_id": "cut", "vla.max_steps": 2}), nproc=2)
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = run_script(user_flags(demo, tmp_path, **{**common, "run_id": "cut", "vla.max_steps": 4,
                                                       "resume_from": "latest"}), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _rows(tmp_path / "ref"), _rows(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("L_act", "L_ret", "lambda", "grad_dot", "grad_cos", "projection", "grad_norm"):
            assert x[key] == y[key], (x["step"], key)
