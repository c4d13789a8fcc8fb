"""The run dashboard draws exactly the logged values, survives missing fields, and starts without torch.

The eval.jsonl rows here are synthetic (the trainer's evaluation hook writes the same schema:
{"step", "epsilon", "eval/<metric>": float, ...}); the metrics.jsonl rows follow the trainer's record.
"""

import json
import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prismatic.training.dashboard import (DashboardConfig, build_dashboard, load_run, load_runs, plot_runs,
                                          rolling_projection_rate)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "vla-scripts" / "plot_run.py"


def craft_row(step, L_act, L_ret, lam, grad_cos, projection, skipped=False):
    return {"step": step, "retention_mode": "hidden", "L_act": L_act, "L_ret": L_ret, "lambda": lam,
            "epsilon": 0.01, "grad_dot": grad_cos, "grad_cos": grad_cos, "projection": projection,
            "learning_rate": 1e-3, "grad_norm": 1.0, "skipped": skipped, "step_time_s": 0.5, "data_time_s": 0.01,
            "samples_per_s": 16.0, "action_accuracy": 0.1, "l1_loss": 0.3}


def plain_row(step, L_act):
    return {"step": step, "retention_mode": "disabled", "L_act": L_act, "L_ret": None, "lambda": None,
            "epsilon": None, "grad_dot": None, "grad_cos": None, "projection": None, "learning_rate": 1e-3,
            "grad_norm": 1.0, "skipped": False, "step_time_s": 0.5, "data_time_s": 0.01, "samples_per_s": 16.0,
            "action_accuracy": 0.1, "l1_loss": 0.3}


CRAFT_ROWS = [
    craft_row(1, 9.0, 0.0, 0.0, 0.0, False),
    craft_row(2, 8.5, 0.02, 0.1, -0.2, True),
    craft_row(3, 8.0, 0.03, 0.3, 0.1, False),
    # a non-finite gradient: the finite L_act must still not be drawn; json.dumps writes the NaN L_ret as NaN
    craft_row(4, 8.2, float("nan"), 0.3, None, None, skipped=True),
    craft_row(5, 7.5, 0.015, 0.35, -0.1, True),
    craft_row(6, 7.0, 0.008, 0.33, -0.3, True),
]
PLAIN_ROWS = [plain_row(s, 9.0 - 0.4 * s) for s in range(1, 7)]
CRAFT_EVAL = [{"step": 3, "epsilon": 0.01, "eval/heldout_L_ret": 0.025, "eval/train_L_ret": 0.02,
               "eval/val_action_accuracy": 0.2, "eval/heldout_frac_over_eps": 0.7},
              {"step": 6, "epsilon": 0.01, "eval/heldout_L_ret": 0.012, "eval/train_L_ret": 0.009,
               "eval/val_action_accuracy": 0.3, "eval/heldout_frac_over_eps": 0.4, "eval/custom_score": 1.5}]
PLAIN_EVAL = [{"step": 3, "epsilon": 0.01, "eval/heldout_L_ret": 0.05, "eval/val_action_accuracy": 0.25},
              {"step": 6, "epsilon": 0.01, "eval/heldout_L_ret": 0.09, "eval/val_action_accuracy": 0.35}]


def write_run(folder: Path, metrics, evals=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if evals is not None:
        (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    return folder


def logged(rows, key, skip_gaps=True):
    """Independent expectation: the step and the float value of a field, NaN where null or skipped."""
    x = [r["step"] for r in rows]
    y = [math.nan if (skip_gaps and r.get("skipped")) or r.get(key) is None else float(r[key]) for r in rows]
    return np.array(x, float), np.array(y, float)


def dashboard(*run_dirs, **cfg):
    """Built in memory: most checks need the drawn data, not a rendered PNG."""
    return build_dashboard([load_run(d) for d in run_dirs], DashboardConfig(**cfg))


def assert_series(actual, expected):
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])  # NaN == NaN here: gaps sit at the same steps


@pytest.fixture
def two_runs(tmp_path):
    craft = write_run(tmp_path / "craft", CRAFT_ROWS, CRAFT_EVAL)
    plain = write_run(tmp_path / "plain", PLAIN_ROWS, PLAIN_EVAL)
    # A resume moved these rows aside: they must not be drawn.
    (craft / "metrics.superseded-20260101-000000.jsonl").write_text(json.dumps(craft_row(7, 99.0, 9.0, 9.0, 0.9, True)) + "\n")
    return craft, plain


def test_plotted_lines_equal_the_logged_values(two_runs, tmp_path):
    craft, plain = two_runs
    dash = plot_runs([craft, plain], tmp_path / "out" / "dash.png", cfg=DashboardConfig(projection_window=3))
    assert (tmp_path / "out" / "dash.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    l_act = dash.lines("L_act")
    assert set(l_act) == {"craft", "plain"}
    assert_series(l_act["craft"], logged(CRAFT_ROWS, "L_act"))
    assert_series(l_act["plain"], logged(PLAIN_ROWS, "L_act"))
    assert np.isnan(l_act["craft"][1][3])  # the skipped step is a gap, not a zero

    drift = dash.lines("drift")
    assert_series(drift["craft · L_ret"], logged(CRAFT_ROWS, "L_ret"))
    assert_series(drift["craft · epsilon"], logged(CRAFT_ROWS, "epsilon"))
    assert_series(drift["craft · eval/heldout_L_ret"], logged(CRAFT_EVAL, "eval/heldout_L_ret", skip_gaps=False))
    assert_series(drift["craft · eval/train_L_ret"], logged(CRAFT_EVAL, "eval/train_L_ret", skip_gaps=False))
    assert_series(drift["plain · eval/heldout_L_ret"], logged(PLAIN_EVAL, "eval/heldout_L_ret", skip_gaps=False))
    # plain fine-tuning logs no budget per step: its eval rows' epsilon is the one it is measured against
    assert_series(drift["plain · epsilon"], logged(PLAIN_EVAL, "epsilon", skip_gaps=False))
    assert "plain · L_ret" not in drift and "plain · eval/train_L_ret" not in drift
    assert dash.axes["drift"].get_yscale() == "log"

    assert_series(dash.lines("lambda")["craft"], logged(CRAFT_ROWS, "lambda"))
    assert_series(dash.lines("grad_cos")["craft"], logged(CRAFT_ROWS, "grad_cos"))
    assert set(dash.lines("lambda")) == {"craft"}  # plain has no lambda: no line, a note instead
    assert dash.axes["lambda"].get_title(loc="right") == "not logged: plain"

    accuracy = dash.lines("action_accuracy")
    assert set(accuracy) == {"craft · eval/val_action_accuracy", "plain · eval/val_action_accuracy"}
    assert_series(accuracy["plain · eval/val_action_accuracy"],
                  logged(PLAIN_EVAL, "eval/val_action_accuracy", skip_gaps=False))
    assert_series(dash.lines("frac_over_eps")["craft · eval/heldout_frac_over_eps"],
                  logged(CRAFT_EVAL, "eval/heldout_frac_over_eps", skip_gaps=False))
    # an eval metric outside the shared vocabulary still gets its panel, with NaN where a row lacks it
    assert_series(dash.lines("eval/custom_score")["craft"], ([3.0, 6.0], [math.nan, 1.5]))
    assert "cos" not in dash.axes and "l1" not in dash.axes  # nobody logged these


def test_superseded_rows_are_not_drawn(two_runs):
    dash = dashboard(*two_runs)
    assert all(99.0 not in y for _, y in dash.lines("L_act").values())
    assert dash.lines("L_act")["craft"][0].max() == 6


def test_skipped_steps_are_marked(two_runs):
    dash = dashboard(*two_runs)
    markers = [line for line in dash.axes["L_act"].get_lines() if line.get_label() == "_craft skipped"]
    assert len(markers) == 1 and list(markers[0].get_xdata()) == [4.0]


def test_a_resume_with_changed_flags_is_a_vertical_line(tmp_path):
    rows = [dict(r) for r in CRAFT_ROWS]
    rows[4]["changes"] = "--craft.epsilon 0.01 -> 0.02"
    craft, plain = write_run(tmp_path / "craft", rows, CRAFT_EVAL), write_run(tmp_path / "plain", PLAIN_ROWS)
    dash = dashboard(craft, plain)
    for panel in ("L_act", "drift", "lambda", "action_accuracy"):
        marks = [line for line in dash.axes[panel].get_lines() if line.get_label() == "_craft changed"]
        assert len(marks) == 1 and list(marks[0].get_xdata()) == [5, 5] and marks[0].get_color() == "C0", panel
    assert "resumed with changed flags (changes.jsonl)" in [t.get_text() for t in dash.figure.legends[0].texts]
    assert not [line for line in dash.axes["L_act"].get_lines() if "changed" in line.get_label()
                and "plain" in line.get_label()]
    assert "resumed with changed flags" not in str([t.get_text() for t in dashboard(plain).figure.legends[0].texts])


def test_rolling_projection_rate_by_hand():
    # Steps reaching the surgery: 1 F, 2 T, 3 F, 5 T, 6 T (step 4 skipped). W = 3:
    # 1: 0/1   2: 1/2   3: 1/3   5: (T,F,T) 2/3   6: (F,T,T) 2/3
    steps, rate = rolling_projection_rate(CRAFT_ROWS, window=3)
    np.testing.assert_array_equal(steps, [1, 2, 3, 5, 6])
    np.testing.assert_allclose(rate, [0.0, 0.5, 1 / 3, 2 / 3, 2 / 3], rtol=0, atol=1e-15)
    steps, rate = rolling_projection_rate(CRAFT_ROWS, window=1)
    np.testing.assert_array_equal(rate, [0, 1, 0, 1, 1])


def test_projection_rate_is_drawn_on_the_twin_axis(two_runs):
    dash = dashboard(*two_runs, projection_window=2)
    lines = dash.lines("projection_rate")
    assert set(lines) == {"craft · projection rate"}  # plain fine-tuning never projects: no line
    # W = 2 over F, T, F, T, T: 0/1, 1/2, 1/2, 1/2, 2/2
    assert_series(lines["craft · projection rate"], ([1, 2, 3, 5, 6], [0.0, 0.5, 0.5, 0.5, 1.0]))


def test_plain_run_alone_says_not_logged(tmp_path):
    plain = write_run(tmp_path / "plain", PLAIN_ROWS)
    dash = dashboard(plain)
    for panel in ("drift", "lambda", "grad_cos", "eval"):
        assert dash.lines(panel) == {}
        assert [t.get_text() for t in dash.axes[panel].texts] == ["not logged"]
    assert dash.axes["drift"].get_yscale() == "linear"


def test_labels_and_unfinished_last_line(two_runs, tmp_path):
    craft, plain = two_runs
    with open(craft / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "L_act": 1')  # the trainer is writing this row right now
    dash = build_dashboard(load_runs([craft, plain], labels=["CRaFT", "plain FT"]))
    assert set(dash.lines("L_act")) == {"CRaFT", "plain FT"}
    assert dash.lines("L_act")["CRaFT"][0].max() == 6


GOOD_LOG = json.dumps(plain_row(1, 1.0)) + "\n"


@pytest.mark.parametrize("log, labels, out_name, message", [
    (None, None, "dash.png", "expected a folder"),  # the run folder does not exist
    ("", None, "dash.png", "expected metrics.jsonl or eval.jsonl, found neither"),
    (GOOD_LOG + "{oops\n", None, "dash.png", "metrics.jsonl:2: expected one JSON object per line"),
    ('{"L_act": 1.0}\n', None, "dash.png", "metrics.jsonl:1: expected an object with an integer 'step'"),
    (GOOD_LOG.replace("1.0", '"high"', 1), None, "dash.png", "log field 'L_act' at step 1: expected a number or null"),
    (GOOD_LOG, ["x", "y"], "dash.png", "--labels: expected one label per run directory (1), found 2"),
    (GOOD_LOG, None, "dash.jpg", "--out: expected a file name ending in .png"),
])
def test_bad_input_is_one_clear_error(tmp_path, log, labels, out_name, message):
    run = tmp_path / "run"
    if log is not None:
        run.mkdir()
        if log:
            (run / "metrics.jsonl").write_text(log)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        plot_runs([run], tmp_path / out_name, labels=labels)
    assert not (tmp_path / out_name).exists()


def test_runs_with_the_same_folder_name_need_labels(tmp_path):
    runs = [write_run(tmp_path / parent / "run", PLAIN_ROWS) for parent in ("a", "b")]
    with pytest.raises(ValueError, match="run labels must differ"):
        load_runs(runs)
    assert [run.label for run in load_runs(runs, labels=["a", "b"])] == ["a", "b"]


def test_module_imports_neither_torch_nor_tensorflow():
    """Loaded by file path, so the check covers this module's own imports, not its package's."""
    path = REPO / "prismatic" / "training" / "dashboard.py"
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('dashboard', {str(path)!r})\n"
            f"spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            f"print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_script_writes_the_png(two_runs, tmp_path):
    craft, plain = two_runs
    out = tmp_path / "script.png"
    result = subprocess.run([sys.executable, str(SCRIPT), str(craft), str(plain), "--out", str(out),
                             "--projection_window", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dashboard: {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_reports_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 2
    assert "plot_run.py: error: run directory" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
