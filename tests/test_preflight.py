"""Every bad input stops the run in the pre-flight checks with one clear message, writing nothing."""

import json
import shutil

import pytest

from prismatic.conf.train import TrainConfig
from prismatic.training.preflight import PreflightError, preflight


def _cfg(demo, tmp_path, **changes):
    cfg = TrainConfig(pretrained_checkpoint=demo / "model", data_root_dir=demo / "rlds", run_root_dir=tmp_path / "runs",
                      run_id="run")
    cfg.craft.anchor_cache_dir = demo / "anchor_cache"
    cfg.vla.enable_mixed_precision_training = False  # the demo cache's float32
    for key, value in changes.items():
        obj, _, attr = key.rpartition(".")
        setattr(getattr(cfg, obj) if obj else cfg, attr, value)
    return cfg


def _fails(cfg, *fragments):
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    assert all(f in message for f in fragments), message
    assert not (cfg.run_root_dir / "run").exists()
    return message


def test_demo_configuration_passes(demo, tmp_path):
    plan = preflight(_cfg(demo, tmp_path))
    assert plan.cache.num_anchors == 16 and plan.grad_accumulation_steps == 1


@pytest.mark.parametrize("changes,fragments", [
    ({"vla.data_mix": "libero_91"}, ["--vla.data_mix", "libero_91", "libero_90"]),
    ({"craft.epsilon": 0.0}, ["--craft.epsilon", "> 0", "0.0"]),
    ({"craft.epsilon": -0.1}, ["--craft.epsilon", "-0.1"]),
    ({"vla.learning_rate": -1e-5}, ["--vla.learning_rate", "-1e-05"]),
    ({"craft.lambda_lr": -1.0}, ["--craft.lambda_lr", "-1.0"]),
    ({"vla.global_batch_size": 12}, ["--vla.global_batch_size 12", "--vla.per_device_batch_size 8"]),
    ({"craft.hidden_layer": 7}, ["--craft.hidden_layer", "5 hidden states", "7"]),
    ({"craft.anchor_batch_size": 17}, ["--craft.anchor_batch_size is 17", "only 16 anchors"]),
    ({"craft.retention_mode": "logits"}, ["--craft.retention_mode", "hidden", "logits"]),
    ({"vla.enable_mixed_precision_training": True}, ["computes in bfloat16 (--vla.enable_mixed_precision_training",
                                                    "computed in float32"]),
    ({"sharding_strategy": "zero3"}, ["--sharding_strategy", "zero3"]),
    ({"resume_with_changes": True}, ["--resume_with_changes true applies to a resume", "--resume_from not set"]),
])
def test_bad_flags(demo, tmp_path, changes, fragments):
    _fails(_cfg(demo, tmp_path, **changes), *fragments)


def test_missing_dataset_names_the_root_and_what_is_there(demo, tmp_path):
    _fails(_cfg(demo, tmp_path, data_root_dir=tmp_path / "nowhere"), "--data_root_dir", "nowhere")
    (tmp_path / "rlds" / "libero_10_no_noops").mkdir(parents=True)
    _fails(_cfg(demo, tmp_path, data_root_dir=tmp_path / "rlds"), "libero_90_no_noops", "libero_10_no_noops")


def test_missing_checkpoint(demo, tmp_path):
    _fails(_cfg(demo, tmp_path, pretrained_checkpoint=tmp_path / "ckpt"), "--pretrained_checkpoint", "config.json")
    _fails(_cfg(demo, tmp_path, pretrained_checkpoint=None), "--pretrained_checkpoint is required")


def test_truncated_anchor_cache(demo, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo / "anchor_cache", cache)
    f = cache / "images.npy"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": cache}), "images.npy", "corrupt or truncated")


def test_cache_metadata_from_a_newer_format(demo, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo / "anchor_cache", cache)
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    _fails(_cfg(demo, tmp_path, **{"craft.anchor_cache_dir": cache}), "format_version 99")


def test_existing_run_is_never_overwritten(demo, tmp_path):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(PreflightError, match="--resume_from latest"):
        preflight(_cfg(demo, tmp_path))
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    with pytest.raises(PreflightError, match="no finished checkpoint"):
        preflight(_cfg(demo, tmp_path, resume_from="latest"))


def test_world_size_must_divide_the_global_batch(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    _fails(_cfg(demo, tmp_path, **{"vla.global_batch_size": 32}), "--vla.global_batch_size 32", "world size 3")


def test_bf16_on_a_cpu_gets_a_note_and_float32_none(demo, demo_bf16_cache, tmp_path):
    """The CPU's fast dtype is float32 (benchmarks/RESULTS.md, section 6): a bf16 CPU run is told so, once."""
    assert not [n for n in preflight(_cfg(demo, tmp_path, device="cpu")).notes if "bf16" in n]
    cfg = _cfg(demo, tmp_path, device="cpu", **{"vla.enable_mixed_precision_training": True})
    cfg.craft.anchor_cache_dir = demo_bf16_cache
    notes = [n for n in preflight(cfg).notes if "bf16 mixed precision on a CPU" in n]
    assert len(notes) == 1 and "--vla.enable_mixed_precision_training false" in notes[0]
