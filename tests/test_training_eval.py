"""The trainer's evaluation rows (eval.jsonl), CRaFT every k-th step, and the "lambda only" ablation, on the
demo assets. Three short in-process runs serve every test: a CRaFT run (retention every 2nd step, a linear
epsilon schedule, no projection, evaluations every 3 steps and at the checkpoints 4 and 8), the same run resumed
from its step-4 checkpoint, and plain fine-tuning against the same anchor cache."""

import json
from pathlib import Path

import draccus
import pytest
import torch
from launch import EPS, LAMBDA_LR, run_cut_at, user_flags

from craft.anchor_cache import AnchorCache
from prismatic.conf.eval import EvalConfig
from prismatic.conf.train import TrainConfig
from prismatic.models import ImageProcessor, load_pretrained
from prismatic.training.evaluation import build_evaluator
from prismatic.training.trainer import train
from prismatic.models.action_tokenizer import ActionTokenizer

STEPS, SAVE, EVERY, BATCH = 8, 4, 3, 4
EPS_START, EPS_END = 0.004, 0.001
DRIFT = {f"eval/{s}_{m}" for s in ("heldout", "train") for m in ("L_ret", "frac_over_eps", "cos")}
VAL = {"eval/val_L_act", "eval/val_action_accuracy", "eval/val_l1"}
RETENTION_FIELDS = ("L_ret", "epsilon", "grad_dot", "grad_cos", "projection")


def schedule(step: int) -> float:
    """The linear budget at training step `step` (counted from 0), over the run's STEPS steps."""
    return EPS_START + (EPS_END - EPS_START) * min(step, STEPS) / STEPS


def run(demo: Path, root: Path, **overrides) -> Path:
    args = user_flags(demo, root, **{"vla.per_device_batch_size": BATCH, "eval.batches": 1, **overrides})
    train(draccus.parse(TrainConfig, args=args))
    return root / "run"


def read(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def craft_flags(**extra) -> dict:
    return {"vla.max_steps": STEPS, "save_interval": SAVE, "eval.interval": EVERY, "craft.retention_interval": 2,
            "craft.conflict_projection": "false", "craft.epsilon_schedule": "linear",
            "craft.epsilon_start": EPS_START, "craft.epsilon": EPS_END, **extra}


@pytest.fixture(scope="module")
def craft_run(demo, tmp_path_factory):
    """The CRaFT run's folder and its logs as they were when it finished."""
    run_dir = run(demo, tmp_path_factory.mktemp("craft"), **craft_flags())
    return run_dir, read(run_dir / "metrics.jsonl"), read(run_dir / "eval.jsonl")


@pytest.fixture(scope="module")
def plain_rows(demo, tmp_path_factory):
    run_dir = run(demo, tmp_path_factory.mktemp("plain"), **{"craft.enabled": "false", "vla.max_steps": 4,
                                                             "save_interval": 100, "eval.interval": 2})
    return read(run_dir / "eval.jsonl")


def test_craft_and_plain_runs_evaluate_the_same_metrics_at_start_interval_checkpoints_and_end(craft_run, plain_rows):
    _, _, rows = craft_run
    assert [r["step"] for r in rows] == [0, 3, 4, 6, 8]  # start, every 3, checkpoints 4 and 8 (also the end)
    assert [r["step"] for r in plain_rows] == [0, 2, 4]
    for r in rows + plain_rows:
        assert {k for k in r if k.startswith("eval/")} == DRIFT | VAL, r
    assert [r["epsilon"] for r in rows] == pytest.approx([schedule(r["step"]) for r in rows], rel=1e-12)
    assert all(r["epsilon"] == EPS for r in plain_rows)  # the plain run's constant --craft.epsilon

    # Step 0: both runs start from the model that built the cache, at the cache's precision (float32).
    start, plain_start = rows[0], plain_rows[0]
    for r in (start, plain_start):
        assert r["eval/heldout_L_ret"] < 1e-6 and r["eval/train_L_ret"] < 1e-6
        assert r["eval/heldout_frac_over_eps"] == 0.0 and r["eval/train_frac_over_eps"] == 0.0
        assert r["eval/heldout_cos"] == pytest.approx(1.0, abs=1e-6)
    assert {k: start[k] for k in DRIFT | VAL} == {k: plain_start[k] for k in DRIFT | VAL}  # same model, same frames
    # Later rows see the model being trained, not a copy of the start: it drifts and fits the new data.
    for later in (rows[-1], plain_rows[-1]):
        assert later["eval/heldout_L_ret"] > 1e-3 and later["eval/heldout_cos"] < 0.99
    assert rows[-1]["eval/val_L_act"] < start["eval/val_L_act"]


def test_last_eval_row_is_the_saved_final_model_evaluated_again(demo, craft_run):
    """Round trip: the step-8 checkpoint, loaded and evaluated like the trainer does, gives the step-8 row."""
    run_dir, _, rows = craft_run
    final = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    model, tokenizer, config = load_pretrained(final)
    evaluator = build_evaluator(
        EvalConfig(batches=1), model, cache=AnchorCache.open(demo / "anchor_cache"), loss_type="mse",
        processor=ImageProcessor.from_pretrained(final, config), tokenizer=tokenizer,
        action_tokenizer=ActionTokenizer(n_bins=config.n_action_bins), max_length=config.llm_max_length,
        data_root_dir=demo / "rlds", data_mix="libero_90", batch_size=BATCH, device=torch.device("cpu"),
        seed=TrainConfig.seed)
    again = evaluator(STEPS, schedule(STEPS))
    for key in DRIFT | VAL:
        assert again[key] == pytest.approx(rows[-1][key], rel=1e-6, abs=1e-9), key


def test_resume_restores_the_uninterrupted_eval_history_and_sets_the_rest_aside(demo, craft_run, tmp_path):
    run_dir, metrics, rows = craft_run
    copy = run_cut_at(run_dir, SAVE, tmp_path / "run")
    original_eval = (copy / "eval.jsonl").read_text().splitlines()

    run(demo, tmp_path, **craft_flags(resume_from=str(copy / "checkpoints" / f"step-{SAVE:06d}")))

    got = read(copy / "eval.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in rows]
    for a, b in zip(rows, got):
        assert {k: v for k, v in b.items() if k != "eval_time_s"} == {k: v for k, v in a.items() if k != "eval_time_s"}
        if a["step"] <= SAVE:
            assert b == a  # rows up to the checkpoint are kept as written, not recomputed
    aside = list(copy.glob("eval.superseded-*.jsonl"))
    assert len(aside) == 1
    moved = aside[0].read_text().splitlines()
    assert [json.loads(line)["step"] for line in moved] == [6, 8]
    assert [line for line in original_eval if json.loads(line)["step"] <= SAVE] + moved == original_eval  # none lost
    resumed = read(copy / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(metrics, resumed):
        for key in ("L_act", "lambda", *RETENTION_FIELDS):
            assert b[key] == a[key], (a["step"], key)


def test_retention_every_second_step_updates_lambda_and_follows_the_schedule_by_training_step(craft_run):
    _, metrics, _ = craft_run
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    lam = 0.0
    for r in metrics:
        craft = r["step"] % 2 == 1  # 1-based steps 1, 3, 5, 7: the 0-based steps 0, 2, 4, 6
        assert r["retention_mode"] == "hidden"
        if craft:
            assert all(r[k] is not None for k in RETENTION_FIELDS), r
            # The budget of training step step-1, not of the number of multiplier updates so far.
            assert r["epsilon"] == pytest.approx(schedule(r["step"] - 1), rel=1e-12)
            lam = max(0.0, lam + LAMBDA_LR * (r["L_ret"] - r["epsilon"]))
        else:
            assert all(r[k] is None for k in RETENTION_FIELDS), r
        assert r["lambda"] == pytest.approx(lam, rel=1e-9, abs=1e-12)
    assert schedule(2) != schedule(1)  # the step-3 row above tells the two readings apart
    lams = [r["lambda"] for r in metrics]
    assert lams[-1] > 0 and all(lams[i] == lams[i - 1] for i in range(1, STEPS, 2))  # baseline steps keep it


def test_no_conflict_projection_never_projects_even_when_the_gradients_conflict(craft_run):
    _, metrics, _ = craft_run
    craft = [r for r in metrics if r["L_ret"] is not None]
    assert len(craft) == STEPS // 2
    assert all(r["projection"] is False and r["grad_dot"] is not None for r in craft)
    assert any(r["grad_dot"] < 0 for r in craft)  # a step that projection would have changed
