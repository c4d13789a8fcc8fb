"""A checkpoint carries the flags that produced it: a resume that changes one breaking exactness stops
before any work, naming every such flag; a safe change (--vla.max_steps) resumes exactly; with
--resume_with_changes true the budget, dual update and learning rate may change, and the run carries on from the
checkpoint's optimizer state, lambda and data position with the new values."""

import json

import draccus
import pytest
import torch
from launch import EPS, LAMBDA_LR, error_line, run_cut_at, run_script, user_flags
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from prismatic.conf.train import TrainConfig, config_dict, resume_breaking_changes
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


def _optimizer_state(checkpoint, tmp_path) -> dict:
    dcp_to_torch_save(checkpoint / "optimizer", tmp_path / "optimizer.pt")
    return torch.load(tmp_path / "optimizer.pt", weights_only=False)["optimizer"]


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
    retunable = [n.split(" ")[0] for n in named if n.startswith(("--craft.epsilon", "--craft.lambda_lr"))]
    assert (f"--resume_with_changes true accepts {', '.join(retunable)} " in message) == bool(retunable), message


def test_the_switch_still_refuses_what_it_cannot_honour(demo, runs):
    cfg = _parse(flags(demo, runs, "short", resume_from="latest", resume_with_changes="true",
                       **{"vla.max_steps": 2, "craft.epsilon": 0.01, "seed": 8, "craft.hidden_layer": -3}))
    with pytest.raises(PreflightError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "changed: --craft.hidden_layer -2 -> -3; --seed 7 -> 8. Launch with" in message, message
    assert "epsilon" not in message and "--resume_with_changes true accepts" not in message


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


def test_resume_with_changes_carries_on_with_the_new_values(demo, runs, tmp_path):
    run = run_cut_at(runs / "short", 2, runs / "retuned")
    saved = json.loads((run / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    res = run_script(flags(demo, runs, "retuned", resume_from="latest", resume_with_changes="true",
                           **{"vla.max_steps": 4, "craft.epsilon": 0.01, "vla.learning_rate": 5e-4}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "note: resumed with --craft.epsilon 0.001 -> 0.01" in res.stdout
    ref, got = rows(runs / "ref"), rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and EPS == 0.001
    # Step 3 starts from the checkpoint's weights, data position and RNG: the same losses as the uninterrupted run.
    for key in ("L_act", "L_ret", "grad_dot", "grad_cos", "action_accuracy"):
        assert got[2][key] == ref[2][key], key
    # ... and is held to the new budget, moving the checkpoint's lambda with it (gradient ascent, by hand).
    assert [r["epsilon"] for r in got] == [0.001, 0.001, 0.01, 0.01]
    assert got[2]["lambda"] == pytest.approx(max(0.0, saved["craft"]["lambda"] + LAMBDA_LR * (got[2]["L_ret"] - 0.01)))
    assert got[2]["lambda"] != ref[2]["lambda"]
    assert [r["learning_rate"] for r in got] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert got[2]["changes"] == ("--craft.epsilon 0.001 -> 0.01; --run_id short -> retuned; "
                                 "--vla.learning_rate 0.001 -> 0.0005; --vla.max_steps 2 -> 4")
    assert "changes" not in got[3] and "changes" not in got[1]
    logged = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert [(c["step"], c["flag"], c["old"], c["new"]) for c in logged] == [
        (3, "--craft.epsilon", 0.001, 0.01), (3, "--run_id", "short", "retuned"),
        (3, "--vla.learning_rate", 0.001, 0.0005), (3, "--vla.max_steps", 2, 4)]
    # The optimizer state went on from the checkpoint's: AdamW has counted 4 steps, as in the uninterrupted run.
    ref_state, state = (_optimizer_state(r / "checkpoints" / "step-000004", tmp_path) for r in (runs / "ref", run))
    trained = ref_state["state"].keys()  # the parameters that get gradients (not the unused last ViT block)
    assert {float(ref_state["state"][k]["step"]) for k in trained} == {4.0}
    assert {k: float(state["state"][k]["step"]) for k in trained} == {k: 4.0 for k in trained}
    assert {g["lr"] for g in state["param_groups"]} == {5e-4}
    assert json.loads((run / "checkpoints" / "step-000004" / CONFIG_FILE).read_text())["craft"]["epsilon"] == 0.01


def test_a_checkpoint_from_before_a_flag_existed_resumes_while_the_flag_keeps_its_default():
    """Flags added since a checkpoint was written default to the behaviour it ran with; only moving them counts."""
    cfg = TrainConfig()
    cfg.craft.enabled = False
    cfg.craft.validate()  # resolves the retention loss type, so the saved configuration names it
    assert cfg.craft.retention_loss_type == "mse"
    saved = config_dict(cfg)
    del saved["vla"]["l2_sp_weight"], saved["vla"]["replay_batch_size"], saved["craft"]["hidden_layers"]
    assert resume_breaking_changes(saved, config_dict(cfg)) == []
    cfg.vla.l2_sp_weight = 0.1
    assert resume_breaking_changes(saved, config_dict(cfg)) == ["--vla.l2_sp_weight 0.0 -> 0.1"]
    gone = config_dict(cfg)  # a flag the run no longer has still counts as changed
    del gone["vla"]["learning_rate"]
    assert "--vla.learning_rate 2e-05 -> (not set)" in resume_breaking_changes(saved, gone)
