"""The forgetting frontier's harness, shortened (one knob value per method, a few steps, one seed, tiny data), so
that it cannot rot. Every method's flags at every knob value are checked against the trainer's configuration; the
short experiment trains the methods that rest on the trainer's newer features (L2-SP, replay, the retention signals
other than the guide's) next to plain fine-tuning."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments" / "forgetting"))
import run as experiment  # noqa: E402
from arms import METHODS, SIGNALS, Calibration, fast_multiple, pick  # noqa: E402
from assets import CONFLICT, NEW, OLD, SHIFTED  # noqa: E402
from runner import LOGS, Run, one_thread  # noqa: E402
from summary import half_width  # noqa: E402

TRAINED = ("plain", "l2_sp", "replay", "craft_last", "craft_layers", "craft_action")
SHORT = dict(seeds=1, workers=1, settings=("new_tasks",), methods=TRAINED, knobs=(1,), pretrain_seeds=(0,), num_tasks=2,
             episodes_per_task=6, steps_per_episode=8, image_size=64, batch_size=4, shuffle_buffer_size=50,
             pretrain_steps=4, finetune_steps=4, num_anchors=8, num_heldout_anchors=4, probe_steps=1,
             eval_interval=4, eval_batches=1, eval_train_anchors=4)


def _probe_row(g_act: np.ndarray, g_ret: np.ndarray) -> dict:
    """What the trainer logs for a lambda = 0 step, computed here from explicit float64 gradients."""
    dot = float(g_act @ g_ret)
    cos = dot / (np.linalg.norm(g_act) * np.linalg.norm(g_ret))
    combined = g_act - dot / float(g_ret @ g_ret) * g_ret if dot < 0 else g_act
    return {"grad_dot": dot, "grad_cos": cos, "projection": dot < 0,
            "grad_norm": float(np.linalg.norm(combined))}


def test_probe_recovers_both_gradient_norms():
    rng = np.random.default_rng(0)
    rows, act, ret = [], [], []
    for sign in (1, -1, -1):  # with and without the conflict projection
        g_act, g_ret = rng.normal(size=50), rng.normal(size=50) * 0.01
        g_ret *= sign * np.sign(g_act @ g_ret)
        rows.append(_probe_row(g_act, g_ret))
        act.append(np.linalg.norm(g_act))
        ret.append(np.linalg.norm(g_ret))
    assert experiment.gradient_norms(rows) == pytest.approx((np.median(act), np.median(ret)), rel=1e-9)


def _flag(flags, name):
    return float(flags[flags.index(name) + 1])


def test_knob_values_follow_the_written_rules():
    cal = Calibration(lr=3e-4, drift={"guide": 300.0, "last": 0.2, "layers": 0.3, "action": 0.5},
                      grad_ratio={"guide": 0.003, "last": 2.0, "layers": 1.5, "action": 4.0}, grad_act=0.6,
                      weight_distance=12.0)
    plain = METHODS["plain"]
    assert [plain.learning_rate(cal, v) for v in (*plain.values, *plain.new_tasks_only)] == pytest.approx(
        [1e-4, 3e-4, 9e-4, 3e-3])
    full = experiment.ForgettingConfig()  # 10x is run in new_tasks alone: the fast regime's candidate
    assert full.knob_values("plain") == (*plain.values, 10.0) and full.knob_values("plain", "fast") == plain.values
    assert METHODS["l2_sp"].learning_rate(cal, 30.0) == 3e-4
    for m in METHODS["craft_last"].values:  # fixed penalty: m R_s, for each signal its own R
        assert _flag(METHODS["craft_last"].flags(cal, m), "--craft.lambda_init") == pytest.approx(m * 2.0)
        assert _flag(METHODS["craft_action"].flags(cal, m), "--craft.lambda_init") == pytest.approx(m * 4.0)
        assert _flag(METHODS["l2_sp"].flags(cal, m), "--vla.l2_sp_weight") == pytest.approx(m * 0.6 / 12.0)
    for lam in METHODS["craft_action_unit"].values:  # absolute lambda: no calibration enters
        assert _flag(METHODS["craft_action_unit"].flags(cal, lam), "--craft.lambda_init") == lam
    pi = METHODS["craft_last_pi"].flags(cal, 0.1)
    assert _flag(pi, "--craft.epsilon") == pytest.approx(0.02)
    assert _flag(pi, "--craft.lambda_lr") * 0.9 * 0.2 == pytest.approx(2.0 / 10 * 0.02)  # ki x plain-level violation
    assert _flag(pi, "--craft.lambda_kp") == pytest.approx(2.0 / 3) and _flag(pi, "--craft.lambda_max") == 60.0
    action_pi = METHODS["craft_action_pi"].flags(cal, 0.1)  # the same rule on the action signal's D and R
    assert _flag(action_pi, "--craft.epsilon") == pytest.approx(0.05) and _flag(action_pi, "--craft.lambda_kp") == \
        pytest.approx(4.0 / 3) and action_pi[:2] == ["--craft.retention_mode", "action"]
    assert METHODS["craft_layers"].flags(cal, 3.0)[:4] == ["--craft.retention_mode", "hidden",
                                                           "--craft.hidden_layers", "[-1,-2]"]


def test_every_method_and_knob_value_is_a_valid_trainer_configuration(tmp_path):
    import draccus

    from prismatic.conf.train import TrainConfig

    cfg = experiment.ForgettingConfig(out=tmp_path)
    model = experiment.Model(0, tmp_path / "pretrained", {s: tmp_path / f"cache_{s}" for s in SIGNALS})
    cal = Calibration(lr=3e-4, drift={s: 0.5 for s in SIGNALS}, grad_ratio={s: 2.0 for s in SIGNALS}, grad_act=1.0,
                      weight_distance=10.0)
    for method in METHODS:
        for value in cfg.knob_values(method):
            run = experiment.method_run(cfg, model, cal, "new_tasks", method, value, 1)
            train = draccus.parse(TrainConfig, args=run.flags())
            train.vla.validate(1)
            train.craft.validate()
            assert train.craft.enabled == method.startswith("craft")
            if train.craft.enabled:
                assert train.craft.anchor_cache_dir == model.caches[METHODS[method].signal]


def test_regime_and_knob_picks_follow_the_written_rules():
    assert half_width([1.0, 3.0]) == pytest.approx(12.706)  # t(0.975, 1) x std sqrt(2) / sqrt(2)
    default = [0.07, 0.08, 0.09]
    assert fast_multiple({1.0: default, 3.0: [0.09, 0.10, 0.11], 10.0: [0.3, 0.31, 0.32]}) == 10.0
    assert fast_multiple({1.0: default, 3.0: [0.20, 0.21, 0.22], 10.0: [0.3, 0.31, 0.32]}) == 3.0
    plain = {"new_l1": [0.29, 0.30, 0.31], "old_increase": default}  # B L1 bar: 0.30 + 0.0248
    frontier = {0.3: {"new_l1": [0.30] * 3, "old_increase": [0.06] * 3},
                3.0: {"new_l1": [0.32] * 3, "old_increase": [0.03] * 3},
                30.0: {"new_l1": [0.40] * 3, "old_increase": [0.0] * 3}}
    assert pick(frontier, plain) == 3.0  # the best A among those that learn B as well as plain
    assert pick({v: frontier[v] for v in (30.0,)}, plain) == 30.0  # none does: the one that learns B best


def _episodes(root: Path, name: str) -> list:
    from prismatic.util.tf_setup import import_tensorflow

    import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(root / name / "1.0.0"))
    episodes = [list(ep["steps"]) for ep in tfds.as_numpy(builder.as_dataset(split="train"))]
    return [{"instruction": steps[0]["language_instruction"].decode(),
             "actions": np.stack([s["action"] for s in steps])} for steps in episodes]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    cfg = experiment.ForgettingConfig(out=out / "out", export=out / "export", **SHORT)
    return cfg, experiment.main(cfg)


def test_datasets_split_the_task_space(short_run):
    cfg, _ = short_run
    old, new, conflict, shifted = (_episodes(cfg.out / "data", n) for n in (OLD, NEW, CONFLICT, SHIFTED))
    assert not {e["instruction"] for e in old} & {e["instruction"] for e in new}
    assert {e["instruction"] for e in old} == {e["instruction"] for e in conflict}
    by_task = {e["instruction"]: e["actions"] for e in old}
    for ep in conflict:  # same instruction and scene, other actions: the two cannot both be fitted
        assert np.abs(ep["actions"][:, :6] - by_task[ep["instruction"]][:, :6]).mean() > 0.1
    for a, b in zip(new, shifted):  # B's episodes (only the held-out ones' pictures differ)
        assert a["instruction"] == b["instruction"]
        np.testing.assert_array_equal(a["actions"], b["actions"])


def test_short_experiment_end_to_end(short_run):
    cfg, summary = short_run
    plain = "B-plain-lr0.0003-p0-s1"
    logs = {p.parent.name: experiment.read_jsonl(p) for p in (cfg.out / "runs").glob("B-*/metrics.jsonl")}
    assert sorted(k.split("-")[1] for k in logs) == sorted(TRAINED)  # every method once
    for run_id, rows in logs.items():
        assert len(rows) == cfg.finetune_steps
        assert not (cfg.out / "runs" / run_id / "checkpoints").exists()  # dropped once finished
        assert sorted(p.name for p in (cfg.export / run_id).iterdir()) == ["config.yaml", "eval.jsonl",
                                                                           "metrics.jsonl"]
        if "replay" not in run_id:  # same start, same batches: the first step's action loss is the same forward
            assert rows[0]["L_act"] == pytest.approx(logs[plain][0]["L_act"], rel=1e-5)

    cal = summary["calibration"]["p0-lr0.0003"]
    assert cal == json.loads((cfg.export / "fingerprints.json").read_text())["p0"]["calibration_lr0.0003"]
    calibration_evals = experiment.read_jsonl(cfg.out / "runs" / "cal-p0-lr0.0003-plain" / "eval.jsonl")
    assert cal["drift"]["guide"] == pytest.approx(calibration_evals[-1]["eval/heldout_L_ret"], rel=1e-5)
    assert set(cal["drift"]) == set(cal["grad_ratio"]) == {"guide", "last", "layers", "action"}
    assert cal["weight_distance"] > 0 and cal["grad_act"] > 0
    for signal in ("last", "action"):  # the fixed penalty is m R of its own signal, held for the whole run
        rows = next(r for k, r in logs.items() if k.startswith(f"B-craft_{signal}-"))
        assert all(r["lambda"] == pytest.approx(3.0 * cal["grad_ratio"][signal]) for r in rows)

    table = summary["settings"]["new_tasks"]["rows"]
    for run_id in logs:
        evals = experiment.read_jsonl(cfg.out / "runs" / run_id / "eval.jsonl")
        assert evals[0]["step"] == 0 and evals[-1]["step"] == cfg.finetune_steps
        numbers = summary["settings"]["new_tasks"]["runs"][run_id]
        assert numbers["old_increase"] == pytest.approx(evals[-1]["eval/retention_l1"] - evals[0]["eval/retention_l1"])
        assert numbers["new_l1"] == evals[-1]["eval/val_l1"]
    assert table["plain lr=1"]["new_l1"] == [summary["settings"]["new_tasks"]["runs"][plain]["new_l1"]]
    assert "| craft_action m=3 | 1 |" in (cfg.out / "summary.md").read_text()
    assert (cfg.out / "frontier_new_tasks.png").stat().st_size > 10_000


def test_rerun_continues_adds_a_setting_and_refuses_another_configuration(short_run):
    cfg, summary = short_run
    logs = sorted((cfg.out / "runs").glob("*/metrics.jsonl"))
    written = [p.stat().st_mtime_ns for p in logs]
    methods = ("plain",)
    again = experiment.main(experiment.ForgettingConfig(
        out=cfg.out, export=cfg.export, **{**SHORT, "settings": ("new_tasks", "shifted"),
                                           "methods": methods}))
    assert [p.stat().st_mtime_ns for p in logs] == written  # every run had finished: none ran again
    assert set(again["picks"]) == set(methods)
    shifted = again["settings"]["shifted"]["runs"]
    assert sorted(k.split("-")[1] for k in shifted) == sorted(methods)
    assert all(k.startswith("S-") for k in shifted)
    # Fine-tuning on the shifted dataset is fine-tuning on B: the same frames, step for step; only validation differs.
    on_b, on_s = ([r["L_act"] for r in experiment.read_jsonl(cfg.out / "runs" / f"{key}-plain-lr0.0003-p0-s1" /
                                                             "metrics.jsonl")] for key in ("B", "S"))
    assert on_s == on_b
    with pytest.raises(ValueError, match="another configuration"):
        experiment.main(experiment.ForgettingConfig(out=cfg.out, **{**SHORT, "finetune_steps": 5}))


def test_fresh_machine_continues_from_the_export_and_refuses_another_model(short_run, tmp_path):
    """A new --out with the export folder: finished runs are restored from it, and the regenerated pretrained
    model must be the recorded one (pretraining on a CPU is deterministic)."""
    cfg, _ = short_run
    fresh = experiment.ForgettingConfig(out=tmp_path / "fresh", export=cfg.export, **SHORT)
    run = Run(fresh.out / "runs", "B-plain-lr0.0003-p0-s1", cfg.finetune_steps, (), export=cfg.export)
    assert run.settle()
    assert (run.run_dir / "eval.jsonl").read_text() == (cfg.export / run.run_id / "eval.jsonl").read_text()
    # Stopped after its last rows: settling drops the checkpoint and exports; a row cut short is not done.
    (run.run_dir / "checkpoints" / "step-000004").mkdir(parents=True)
    moved = Run(run.run_root, run.run_id, run.steps, (), export=tmp_path / "elsewhere")
    assert moved.settle() and not (run.run_dir / "checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "elsewhere" / run.run_id).iterdir()) == sorted(LOGS)
    metrics = run.run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    assert not Run(run.run_root, run.run_id, run.steps, ()).settle()
    shutil.copytree(cfg.out / "data", fresh.out / "data")  # written deterministically (tests/test_synthetic.py)
    with one_thread():  # as main() runs it
        experiment.pretrain(fresh, 0)  # checks the regenerated weights against the export's fingerprint

    prints = json.loads((cfg.export / "fingerprints.json").read_text())
    prints["p0"]["pretrained_sha256"] = "0" * 64
    (cfg.export / "fingerprints.json").write_text(json.dumps(prints))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        experiment.pretrain(fresh, 0)  # finished: only the check runs
