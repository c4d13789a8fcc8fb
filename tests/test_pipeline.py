"""The whole demo pipeline once: assets -> anchor cache -> train_craft.py with the user's flags."""

import json
import re
import shutil

import pytest
from launch import EPS, LAMBDA_LR, error_line, run_script, user_flags

def test_training_run_logs_the_eight_fields_and_the_dual_variable_tracks_the_budget(demo, tmp_path):
    res = run_script(user_flags(demo, tmp_path, **{"vla.max_steps": 14, "save_interval": 100}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    for r in rows:
        for key in ("retention_mode", "L_act", "L_ret", "lambda", "epsilon", "grad_dot", "grad_cos", "projection"):
            assert key in r and r[key] is not None, (key, r)
        assert r["retention_mode"] == "hidden" and r["epsilon"] == EPS
        assert r["projection"] == (r["grad_dot"] < 0)
        assert -1.0 <= r["grad_cos"] <= 1.0
    assert rows[0]["L_ret"] == 0.0 and rows[0]["grad_cos"] == 0.0  # the model still equals the cache's model
    first, last = sum(r["L_act"] for r in rows[:3]) / 3, sum(r["L_act"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    lam = 0.0
    for r in rows:  # lambda follows its update rule exactly, so it rises exactly when L_ret > epsilon
        lam = max(0.0, lam + LAMBDA_LR * (r["L_ret"] - EPS))
        assert r["lambda"] == pytest.approx(lam, rel=1e-9, abs=1e-12)
    assert any(r["L_ret"] > EPS for r in rows) and rows[-1]["lambda"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-000014"
    assert json.loads((ckpt / "trainer_state.json").read_text())["craft"]["lambda"] == pytest.approx(rows[-1]["lambda"])
    assert (ckpt / "config.json").is_file() and (ckpt / "dataset_statistics.json").is_file()
    assert "L_act=" in res.stdout and "lambda=" in res.stdout  # the console shows the same fields


def test_dry_run_reports_and_writes_nothing(demo, tmp_path):
    res = run_script(user_flags(demo, tmp_path, dry_run_batches=2, **{"craft.keep_weights_gathered": "true"}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CRaFT pre-flight report" in res.stdout and "2 run, 0 skipped" in res.stdout
    assert not (tmp_path / "run").exists()
    # The memory the flag costs under FSDP, which one process cannot show: every parameter gathered, in float32.
    params = int(re.search(r"([\d,]+) parameters, ", res.stdout).group(1).replace(",", ""))
    line = next(line for line in res.stdout.splitlines() if line.startswith("gathered :"))
    assert f"up to {params * 4 / 2**30:.2f} GiB" in line and line.endswith("no effect on one process"), line


def test_disabled_craft_is_plain_behaviour_cloning(demo, tmp_path):
    res = run_script(user_flags(demo, tmp_path, **{"craft.enabled": "false", "vla.max_steps": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["retention_mode"] for r in rows] == ["disabled"] * 2
    assert all(r["L_ret"] is None and r["lambda"] is None and r["L_act"] > 0 for r in rows)


@pytest.mark.parametrize("override,expected", [
    ({"craft.hidden_layer": -1}, ["--craft.hidden_layer", "-1", "-2"]),
    ({"craft.pooling": "last_token"}, ["--craft.pooling", "last_token", "mean_image_tokens"]),
])
def test_wrong_flags_stop_before_training(demo, tmp_path, override, expected):
    res = run_script(user_flags(demo, tmp_path, **override))
    message = error_line(res)
    assert all(s in message for s in expected), message
    assert "step=" not in res.stdout and not (tmp_path / "run").exists()


def test_cache_from_another_model_width_is_refused(demo, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(demo / "anchor_cache", cache)
    meta = json.loads((cache / "meta.json").read_text())
    meta["hidden_dim"] = 4096
    (cache / "meta.json").write_text(json.dumps(meta))
    message = error_line(run_script(user_flags(demo, tmp_path, **{"craft.anchor_cache_dir": cache})))
    assert "hidden size 4096" in message and "hidden size is 64" in message and "--pretrained_checkpoint" in message
