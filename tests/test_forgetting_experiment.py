"""The forgetting experiment's harness, shortened (two arms, a few steps, one seed), so that it cannot rot."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments" / "forgetting"))
import run as experiment  # noqa: E402
from arms import Calibration  # noqa: E402
from assets import CONFLICT, NEW, OLD  # noqa: E402

SHORT = dict(seeds=1, workers=1, settings=("new_tasks",), arms=("plain", "craft_tuned"), num_tasks=2,
             episodes_per_task=6, steps_per_episode=8, image_size=64, batch_size=4, shuffle_buffer_size=50,
             pretrain_steps=4, finetune_steps=4, num_anchors=8, num_heldout_anchors=4, probe_steps=2,
             eval_interval=2, eval_batches=1, eval_train_anchors=4)


def _probe_row(g_act: np.ndarray, g_ret: np.ndarray) -> dict:
    """What the trainer logs for a lambda = 0 step, computed here from explicit float64 gradients."""
    dot = float(g_act @ g_ret)
    cos = dot / (np.linalg.norm(g_act) * np.linalg.norm(g_ret))
    combined = g_act - dot / float(g_ret @ g_ret) * g_ret if dot < 0 else g_act
    return {"grad_dot": dot, "grad_cos": cos, "projection": dot < 0,
            "grad_norm": float(np.linalg.norm(combined))}


def test_probe_recovers_the_gradient_ratio():
    rng = np.random.default_rng(0)
    rows, ratios = [], []
    for sign in (1, -1, -1):  # with and without the conflict projection
        g_act, g_ret = rng.normal(size=50), rng.normal(size=50) * 0.01
        g_ret *= sign * np.sign(g_act @ g_ret)
        rows.append(_probe_row(g_act, g_ret))
        ratios.append(np.linalg.norm(g_act) / np.linalg.norm(g_ret))
    assert experiment.gradient_ratio(rows) == pytest.approx(float(np.median(ratios)), rel=1e-9)


def test_tuned_numbers_follow_the_stated_rules():
    cal = Calibration(drift=0.02, grad_ratio=50.0)
    assert cal.epsilon == pytest.approx(0.002)
    assert cal.fixed_lambda == pytest.approx(50.0 * np.sqrt(10))
    assert cal.ascent_step * 0.9 * 0.02 == pytest.approx(5.0)  # lambda gains R / 10 per step at drift D


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
    cfg = experiment.ForgettingConfig(out=out, **SHORT)
    return cfg, experiment.main(cfg)


def test_datasets_split_the_task_space(short_run):
    cfg, _ = short_run
    old, new, conflict = (_episodes(cfg.out / "data", n) for n in (OLD, NEW, CONFLICT))
    assert not {e["instruction"] for e in old} & {e["instruction"] for e in new}
    assert {e["instruction"] for e in old} == {e["instruction"] for e in conflict}
    by_task = {e["instruction"]: e["actions"] for e in old}
    for ep in conflict:  # same instruction and scene, other actions: the two cannot both be fitted
        assert np.abs(ep["actions"][:, :6] - by_task[ep["instruction"]][:, :6]).mean() > 0.1


def test_short_experiment_end_to_end(short_run):
    cfg, summary = short_run
    runs = cfg.out / "runs"
    plain, tuned = (experiment.read_jsonl(runs / f"new_tasks-{arm}-s1" / "metrics.jsonl")
                    for arm in ("plain", "craft_tuned"))
    assert len(plain) == len(tuned) == cfg.finetune_steps
    # Identical start and data order: the first step's action loss is the same forward in both arms.
    assert tuned[0]["L_act"] == pytest.approx(plain[0]["L_act"], rel=1e-6)

    cal = json.loads((cfg.out / "calibration.json").read_text())
    calibration_evals = experiment.read_jsonl(runs / "calibration_plain_B" / "eval.jsonl")
    assert cal["drift"] == calibration_evals[-1]["eval/heldout_L_ret"]
    assert tuned[0]["epsilon"] == pytest.approx(cal["epsilon"])
    lam = 0.0  # the tuned arm's multiplier, replayed from its logged L_ret with the calibration's numbers
    step = Calibration(cal["drift"], cal["grad_ratio"]).ascent_step
    for row in tuned:
        lam = max(0.0, lam + step * (row["L_ret"] - cal["epsilon"]))
        assert row["lambda"] == pytest.approx(lam, rel=1e-6, abs=1e-12)

    evals = {arm: experiment.read_jsonl(runs / f"new_tasks-{arm}-s1" / "eval.jsonl")
             for arm in ("plain", "craft_tuned")}
    first = [rows[0] for rows in evals.values()]
    assert first[0]["step"] == first[1]["step"] == 0
    assert first[0]["eval/heldout_L_ret"] < 1e-8  # the pretrained model against its own cache
    assert first[0]["eval/retention_action_accuracy"] == first[1]["eval/retention_action_accuracy"]

    table = summary["settings"]["new_tasks"]["per_arm"]
    assert table["plain"]["time_ratio"] == [1.0]
    for arm in ("plain", "craft_tuned"):
        last = evals[arm][-1]
        assert table[arm]["old_acc"] == [last["eval/retention_action_accuracy"]]
        assert table[arm]["new_l1"] == [last["eval/val_l1"]]
        assert table[arm]["drift_end"] == [last["eval/heldout_L_ret"]]
    assert table["plain"].get("lambda_max") == []
    assert "| craft_tuned |" in (cfg.out / "summary.md").read_text()
    assert (cfg.out / "new_tasks.png").stat().st_size > 10_000


def test_rerun_continues_and_refuses_another_configuration(short_run):
    cfg, summary = short_run
    logs = sorted((cfg.out / "runs").glob("*/metrics.jsonl"))
    written = [p.stat().st_mtime_ns for p in logs]
    again = experiment.main(experiment.ForgettingConfig(out=cfg.out, **{**SHORT, "workers": 2}))
    assert [p.stat().st_mtime_ns for p in logs] == written  # every run had finished: none ran again
    assert again["settings"] == summary["settings"]
    with pytest.raises(ValueError, match="another configuration"):
        experiment.main(experiment.ForgettingConfig(out=cfg.out, **{**SHORT, "finetune_steps": 5}))
