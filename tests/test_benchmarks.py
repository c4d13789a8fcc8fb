"""The benchmark scripts run end to end and write complete JSON. Functional checks only: no timing assertions."""

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TORCHRUN_2 = ("-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2")


def _run(script: str, out: Path, *args: str, timeout: int = 240, launcher=(), env=None) -> dict:
    cmd = [sys.executable, *launcher, str(BENCH / script), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), "no summary line printed"
    return json.loads(out.read_text())


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"


def _common(record: dict) -> None:
    datetime.datetime.fromisoformat(record["date"])
    assert isinstance(record["device"], str) and record["device"]


STEP_KEYS = (
    "device", "preset", "batch", "anchor_batch", "dtype", "date", "torch_version", "transformers_version",
    "params", "trainable_params", "t_base_s", "t_base_bpa_s", "t_craft_s", "t_anchor_s", "t_surgery_s",
    "surgery_bytes", "surgery_bandwidth_gbps", "peak_mem_base_bytes", "peak_mem_craft_bytes", "mem_method",
    "floor_ratio", "ratio", "grad_buffer_bytes", "world_size", "sharded", "sharding_strategy",
)
# The GPU machines have neither TensorFlow nor draccus: the step benchmark runs with both made unimportable.
WITHOUT_TF_DRACCUS = ("-c", "import runpy, sys; sys.modules.update(tensorflow=None, draccus=None); "
                            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
TINY_STEP = ("--preset", "tiny", "--device", "cpu", "--batch", "2", "--anchor_batch", "1", "--repeats", "1")


def _check_step(r: dict, step_impl: str) -> None:
    assert r["step_impl"] == step_impl
    missing = [k for k in STEP_KEYS if k not in r]
    assert not missing, f"missing keys {missing}"
    _common(r)
    assert (r["preset"], r["batch"], r["anchor_batch"], r["dtype"]) == ("tiny", 2, 1, "float32")
    _positive(r, "t_base_s", "t_base_bpa_s", "t_craft_s", "t_anchor_s", "t_surgery_s", "ratio", "floor_ratio",
              "surgery_bytes", "surgery_bandwidth_gbps", "params", "trainable_params", "grad_buffer_bytes")
    assert r["ratio"] == pytest.approx(r["t_craft_s"] / r["t_base_s"])
    assert r["floor_ratio"] == pytest.approx((r["t_base_bpa_s"] + r["t_surgery_s"]) / r["t_base_s"])
    assert 0 < r["trainable_params"] <= r["params"]
    assert r["surgery_bytes"] >= r["surgery_bytes_floor"] >= 2 * r["grad_buffer_bytes"]
    for key in ("peak_mem_base_bytes", "peak_mem_craft_bytes"):
        assert isinstance(r[key], int) and r[key] >= 0
    assert r["mem_method"].startswith("cpu:")
    assert all(len(v) == 1 for v in r["times_s"].values())
    assert math.isfinite(r["last_craft_step"]["L_act"]) and math.isfinite(r["last_craft_step"]["L_ret"])
    assert r["flops_base"] > 0 and r["flops_anchor"] > 0
    assert r["flops_craft"] == r["flops_base"] + r["flops_anchor"]
    assert r["peak_flops"] is None and r["mfu_base"] is None and r["mfu_craft"] is None  # cpu, no --peak_tflops
    # The two-pass anchor pass runs BOS and the image only (mean_image_tokens pooling); one_pass whole prompts.
    assert r["anchor_pass_positions"] == (257 if step_impl == "two_pass" else r["seq_len_anchor"])


@pytest.mark.parametrize("step_impl", ["two_pass", "one_pass"])
def test_bench_step_tiny_cpu(tmp_path, step_impl):
    r = _run("bench_step.py", tmp_path / "step.json", *TINY_STEP, "--warmup", "1", "--threads", "2",
             "--step_impl", step_impl, launcher=WITHOUT_TF_DRACCUS)
    _check_step(r, step_impl)
    assert (r["world_size"], r["sharded"], r["sharding_strategy"]) == (1, False, None)
    # fp32 gradients: one action gradient buffer is 4 bytes per parameter that gets one.
    assert r["grad_buffer_bytes"] == 4 * r["grad_params"]


@pytest.mark.parametrize("step_impl", ["two_pass", "one_pass"])
def test_bench_step_tiny_sharded_on_two_cpu_ranks(tmp_path, step_impl):
    keep = ["--keep_weights_gathered", "true"] if step_impl == "two_pass" else []  # the default: test_distributed
    r = _run("bench_step.py", tmp_path / "step.json", *TINY_STEP, "--warmup", "0", "--step_impl", step_impl, *keep,
             launcher=TORCHRUN_2, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _check_step(r, step_impl)
    assert (r["world_size"], r["sharded"], r["sharding_strategy"]) == (2, True, "full-shard")
    assert r["keep_weights_gathered"] is bool(keep)
    # Bytes are counted on rank 0's shards: at least half of each gradient (FSDP rounds rank 0's rows up).
    assert 2 * r["grad_params"] <= r["grad_buffer_bytes"] < 4 * r["grad_params"]


def test_bench_anchor_cache_small(tmp_path):
    cache_dir = tmp_path / "cache"
    r = _run("bench_anchor_cache.py", tmp_path / "cache.json", "--num_anchors", "16", "--anchor_batch", "2", "4",
             "--batches", "3", "--hidden_dim", "64", "--cache_dir", str(cache_dir))
    _common(r)
    assert r["num_anchors"] == 16
    assert r["bytes_per_anchor"] == 224 * 224 * 3 + 40 * 4 + 40 + 64 * 4
    assert r["cache_bytes"] >= 16 * r["bytes_per_anchor"]
    assert [e["anchor_batch"] for e in r["results"]] == [2, 4]
    for entry in r["results"]:
        for regime in ("warm", "cold"):
            _positive(entry[regime], "anchors_per_s", "mb_per_s", "median_batch_ms")
            assert entry[regime]["batches"] == 3
        _positive(entry["preprocess"], "anchors_per_s")
    assert not cache_dir.exists(), "the benchmark's cache must be removed without --keep_cache"


def test_bench_loader_few_frames(tmp_path):
    r = _run("bench_loader.py", tmp_path / "loader.json", "--frames", "20", "--num_tasks", "1",
             "--episodes_per_task", "2", "--steps_per_episode", "8", "--source_image_size", "64",
             "--shuffle_buffer_size", "8")
    _common(r)
    assert r["frames"] == 20 and r["image_size"] == 224
    assert set(r["modes"]) == {"aug_off", "aug_on"}
    for mode in r["modes"].values():
        _positive(mode, "frames_per_s", "t_read_s", "t_first_frame_s")
        assert mode["timed_frames"] == 20
    assert r["ru_maxrss_bytes"] > 0 and r["dataset"]["synthetic"] is True
