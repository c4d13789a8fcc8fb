"""A checkpoint carries the flags that produced it: a resume that changes one breaking exactness stops
before any work, naming every such flag; a safe change (--vla.max_steps) resumes exactly."""

import json

import draccus
import pytest
from launch import error_line, run_script, user_flags

from prismatic.conf.train import TrainConfig, config_dict
from prismatic.training.checkpointing import CONFIG_FILE, complete_checkpoints
from prismatic.training.preflight import PreflightError, preflight

COMPARED = ("L_act", "L_ret", "lambda", "epsilon", "grad_dot", "grad_cos", "projection", "grad_norm", "learning_rate",
            "action_accuracy", "l1_loss")


def flags(demo, root, run_id, **extra):
    return user_flags(demo, root, **{"run_id": run_id, "vla.per_device_batch_size": 4, "save_interval": 2, **extra})


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    """An uninterrupted 4-step run, and the same run stopped after 2 steps (its --vla.max_steps)."""
    root = tmp_path_factory.mktemp("runs")
    for run_id, steps in (("ref", 4), ("short", 2)):
        res = run_script(flags(demo, root, run_id, **{"vla.max_steps": steps}))
        assert res.returncode == 0, res.stderr[-3000:]
    return root


def _parse(args: list) -> TrainConfig:
    return draccus.parse(config_class=TrainConfig, args=args)


def test_checkpoint_holds_the_flags_it_was_written_with(demo, runs):
    saved = json.loads((complete_checkpoints(runs / "short")[-1] / CONFIG_FILE).read_text())
    assert saved == config_dict(_parse(flags(demo, runs, "short", **{"vla.max_steps": 2})))
    assert saved["vla"]["per_device_batch_size"] == 4 and saved["craft"]["epsilon"] == 0.001


@pytest.mark.parametrize("changes,world_size,named", [
    ({"vla.per_device_batch_size": 2}, 1, ["--vla.per_device_batch_size 4 -> 2"]),
    ({"craft.epsilon": 0.01}, 1, ["--craft.epsilon 0.001 -> 0.01"]),
    ({}, 2, ["world size (torchrun processes) 1 -> 2"]),
    ({"seed": 8, "craft.lambda_lr": 1.0, "vla.data_mix": "libero_10"}, 1,
     ["--seed 7 -> 8", "--craft.lambda_lr 50.0 -> 1.0", "--vla.data_mix libero_90 -> libero_10"]),
])
def test_a_breaking_change_stops_the_resume_before_any_work(demo, runs, monkeypatch, changes, world_size, named):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world_size))
    before = (runs / "short" / "metrics.jsonl").read_text()
    cfg = _parse(flags(demo, runs, "short", resume_from="latest", **{"vla.max_steps": 2, **changes}))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    assert all(n in message for n in named), message
    assert message.count(" -> ") == len(named), message  # nothing else is blamed
    assert CONFIG_FILE in message and "step-000002" in message
    assert (runs / "short" / "metrics.jsonl").read_text() == before


def test_safe_changes_pass_the_check(demo, runs):
    safe = {"vla.max_steps": 4, "save_interval": 5, "keep_last_checkpoints": 1, "wandb_mode": "offline",
            "run_id_note": "more", "dist_timeout_s": 60, "craft.keep_weights_gathered": "true"}
    cfg = _parse(flags(demo, runs, "short", resume_from=str(complete_checkpoints(runs / "short")[-1]), **safe))
    cfg.trackers = ("jsonl", "wandb")
    assert preflight(cfg).resume_path.name == "step-000002"


def test_launched_resume_with_a_changed_flag_ends_on_the_error(demo, runs):
    res = run_script(flags(demo, runs, "short", resume_from="latest",
                           **{"vla.max_steps": 4, "vla.per_device_batch_size": 2}))
    assert "--vla.per_device_batch_size 4 -> 2" in error_line(res)  # also the last line torchrun prints
    assert len(rows(runs / "short")) == 2


def test_resume_with_more_steps_is_exact(demo, runs):
    res = run_script(flags(demo, runs, "short", resume_from="latest", **{"vla.max_steps": 4}))
    assert res.returncode == 0, res.stderr[-3000:]
    ref, got = rows(runs / "ref"), rows(runs / "short")
    assert [r["step"] for r in got] == list(range(1, 5))
    for a, b in zip(ref, got):
        for key in COMPARED:
            assert b[key] == a[key], (a["step"], key, a[key], b[key])
