"""OpenVLA's LIBERO protocol, results and the evaluation loop, without the simulator (always runs)."""

import json
import math
from collections import deque

import numpy as np
import pytest
import torch

from prismatic.models import OpenVLA, build_tiny_tokenizer, preset_config
from prismatic.models.predict import predict_action
from prismatic.sim import libero_env
from prismatic.sim.evaluate import LiberoEvalConfig, LiberoPolicy, _Episode, _play
from prismatic.sim.protocol import (
    CAMERA_SIZE, ENV_SEED, MAX_STEPS, SETTLE_ACTION, SETTLE_STEPS, env_actions, policy_image, resolve_unnorm_key,
)
from prismatic.sim.results import EpisodeLog, markdown_table, summarize, wilson_interval
from prismatic.util.tf_setup import import_tensorflow
from prismatic.models.batching import prompt_text


def test_protocol_constants_are_openvlas():
    assert MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                         "libero_90": 400}
    assert SETTLE_STEPS == 10 and SETTLE_ACTION == (0, 0, 0, 0, 0, 0, -1)
    assert CAMERA_SIZE == 256 and ENV_SEED == 0


def _frame(seed=0):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    frame[:32, :32] = (255, 0, 0)  # a red block in the rendered frame's top-left corner
    return frame


def test_policy_image_is_rotated_jpeg_round_tripped_and_lanczos_resized():
    tf = import_tensorflow()
    frame = _frame()
    image = policy_image(frame, 224, center_crop=False)
    assert image.shape == (224, 224, 3) and image.dtype == np.uint8
    # The block ends in the bottom-right corner: turned 180 degrees, not mirrored along one axis.
    assert (np.abs(image[-20:, -20:].astype(int) - (255, 0, 0)) < 40).all()
    upright = np.rot90(frame, 2).copy()
    via_jpeg = tf.io.decode_jpeg(tf.io.encode_jpeg(upright))
    expected = tf.image.resize(via_jpeg, (224, 224), method="lanczos3", antialias=True)
    expected = np.clip(np.round(expected.numpy()), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    no_jpeg = tf.image.resize(upright, (224, 224), method="lanczos3", antialias=True).numpy()
    assert np.abs(image - np.clip(np.round(no_jpeg), 0, 255)).mean() > 1.0  # the JPEG round trip is not skipped


def test_center_crop_is_the_central_90_percent_of_the_area_resized_bilinearly():
    plain, cropped = policy_image(_frame(1), 224, False), policy_image(_frame(1), 224, True)
    # float64 reference: output pixel i samples the plain image at m + i * s / 223 (in pixels of the 223-wide span),
    # where s = sqrt(0.9) and m = (1 - s) / 2 of each side, interpolating bilinearly between the 4 neighbours.
    side = np.sqrt(0.9)
    coords = ((1 - side) / 2 + np.arange(224) * side / 223) * 223
    i0 = np.floor(coords).astype(int)
    w = coords - i0
    i1 = np.minimum(i0 + 1, 223)
    x = plain.astype(np.float64) / 255
    rows = x[i0] * (1 - w)[:, None, None] + x[i1] * w[:, None, None]
    both = rows[:, i0] * (1 - w)[None, :, None] + rows[:, i1] * w[None, :, None]
    expected = np.clip(both * 255.5, 0, 255).astype(np.uint8)  # TF's float -> uint8 conversion
    assert np.abs(cropped.astype(int) - expected).max() <= 1
    assert np.abs(cropped.astype(int) - plain).mean() > 10  # it did crop


def test_gripper_is_binarised_then_inverted():
    actions = np.array([[0.1, -0.2, 0.3, 0.01, 0.02, 0.03, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2]])
    out = env_actions(actions)
    np.testing.assert_array_equal(out[:, :6], actions[:, :6])
    assert out[0, 6] == -1.0 and out[1, 6] == 1.0  # model 1 = close -> LIBERO -1 = close
    assert actions[0, 6] == 0.9  # the input is left alone


def test_prompt_uses_the_lowercased_task_language():
    assert prompt_text("Put The Black Bowl on the plate") == (
        "In: What action should the robot take to put the black bowl on the plate?\nOut:")


def test_unnorm_key_is_the_suites_dataset():
    stats = {"libero_spatial_no_noops": {}, "libero_goal": {}, "libero_goal_no_noops": {}}
    assert resolve_unnorm_key("libero_spatial", stats, None) == "libero_spatial_no_noops"
    assert resolve_unnorm_key("libero_goal", stats, None) == "libero_goal"
    assert resolve_unnorm_key("libero_spatial", stats, "libero_goal") == "libero_goal"
    with pytest.raises(ValueError, match=r"--task_suite libero_10.*libero_10_no_noops.*libero_goal"):
        resolve_unnorm_key("libero_10", stats, None)
    with pytest.raises(ValueError, match="--unnorm_key"):
        resolve_unnorm_key("libero_spatial", stats, "bridge")


def _wilson_by_root_finding(k, n, z=1.959963984540054):
    """The interval's ends solve (k/n - p)^2 = z^2 p (1 - p) / n: found by bisection on each side of k/n."""
    p_hat = k / n
    f = lambda p: (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    def bisect(lo, hi):
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (f(mid) > 0) == (f(lo) > 0) else (lo, mid)
        return (lo + hi) / 2

    return (0.0 if k == 0 else bisect(0.0, p_hat - 1e-12)), (1.0 if k == n else bisect(p_hat + 1e-12, 1.0))


@pytest.mark.parametrize("k,n", [(8, 10), (0, 5), (5, 5), (37, 50), (1, 3)])
def test_wilson_interval(k, n):
    low, high = wilson_interval(k, n)
    exp_low, exp_high = _wilson_by_root_finding(k, n)
    assert math.isclose(low, exp_low, abs_tol=1e-9) and math.isclose(high, exp_high, abs_tol=1e-9)
    if (k, n) == (8, 10):  # the textbook value
        assert round(low, 4) == 0.4902 and round(high, 4) == 0.9433


def test_episode_log_drops_a_cut_off_line_and_resumes(tmp_path):
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    log.append({"task_id": 0, "episode": 0, "success": True})
    with log.path.open("a") as f:
        f.write('{"task_id": 0, "epis')  # an interruption in the middle of a write
    assert log.load() == [{"task_id": 0, "episode": 0, "success": True}]
    log.append({"task_id": 0, "episode": 1, "success": False})
    assert [r["episode"] for r in log.load()] == [0, 1]


def test_summary_counts_per_task_and_suite():
    rows = [{"task_id": 0, "episode": e, "success": e < 3} for e in range(4)]
    rows += [{"task_id": 1, "episode": 0, "success": False, "error": "boom"}, {"task_id": 2, "episode": 0,
                                                                                "success": True}]
    summary = summarize(rows, {0: "task a", 1: "task b"})
    t0, t1 = summary["tasks"]
    assert (t0["successes"], t0["episodes"], t0["success_rate"]) == (3, 4, 0.75)
    assert (t1["successes"], t1["episodes"], t1["errors"]) == (0, 1, 1)
    assert (summary["suite"]["successes"], summary["suite"]["episodes"]) == (3, 5)  # task 2 not asked for
    assert summary["suite"]["ci95"] == list(wilson_interval(3, 5))
    table = markdown_table(summary, "title")
    assert "| 0: task a | 75.0 (" in table and "| **suite** | **60.0 (" in table and "3 / 5" in table


def _checkpoint(tmp_path, norm_stats):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = preset_config("tiny").to_dict()
    config["norm_stats"] = norm_stats
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_config_errors_name_the_flag(tmp_path):
    ckpt = _checkpoint(tmp_path, {"libero_spatial_no_noops": {"action": {}}})
    with pytest.raises(ValueError, match="--checkpoint is required"):
        LiberoEvalConfig().validate()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LiberoEvalConfig(checkpoint=tmp_path / "nope").validate()
    with pytest.raises(ValueError, match="--task_suite must be one of"):
        LiberoEvalConfig(checkpoint=ckpt, task_suite="libero_100").validate()
    with pytest.raises(ValueError, match="--num_envs must be at least 1, got 0"):
        LiberoEvalConfig(checkpoint=ckpt, num_envs=0).validate()
    with pytest.raises(ValueError, match="libero_object_no_noops"):
        LiberoEvalConfig(checkpoint=ckpt, task_suite="libero_object").validate()
    cfg = LiberoEvalConfig(checkpoint=ckpt, output_dir=tmp_path / "out")
    cfg.validate()
    assert cfg.unnorm_key == "libero_spatial_no_noops" and cfg.max_steps == 220
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(json.dumps({**cfg.identity(), "center_crop": True}))
    with pytest.raises(ValueError, match=r"other settings.*'center_crop': \(True, False\)"):
        LiberoEvalConfig(checkpoint=ckpt, output_dir=tmp_path / "out").validate()


def test_missing_simulator_is_named(monkeypatch):
    real = libero_env.importlib.util.find_spec
    monkeypatch.setattr(libero_env.importlib.util, "find_spec",
                        lambda name: None if name == "robosuite" else real(name))
    with pytest.raises(libero_env.LiberoUnavailable, match=r"'robosuite'.*make libero"):
        libero_env.import_libero()


class _ScriptedWorkers:
    """Stands in for the simulator: episode e of every task succeeds after e + 1 steps, except episode 3, whose
    start fails."""

    def __init__(self, n):
        self.n, self.pending, self.state = n, {}, {}

    def __len__(self):
        return self.n

    def start_episode(self, i, task_id, episode):
        self.state[i] = [task_id, episode, 0]
        self.pending[i] = ("error", "RuntimeError: scene") if episode == 3 else ("frame", _frame(episode), False)

    def step(self, i, action):
        assert action.shape == (7,)
        self.state[i][2] += 1
        self.pending[i] = ("frame", _frame(), self.state[i][2] == self.state[i][1] + 1)

    def replies(self, required, optional):
        return {i: self.pending.pop(i) for i in [*required, *optional] if i in self.pending}


def test_play_batches_workers_and_logs_each_episode(tmp_path):
    batches = []

    def policy(frames, instructions):
        batches.append(len(frames))
        return np.tile([0.0, 0, 0, 0, 0, 0, -1.0], (len(frames), 1))

    cfg = LiberoEvalConfig(max_steps=3, video_episodes=[1])
    todo = [_Episode(t, e, f"task {t}") for t in (0, 1) for e in range(5)]
    log = EpisodeLog(tmp_path / "episodes.jsonl")
    _play(cfg, policy, _ScriptedWorkers(3), deque(todo), log, tmp_path)
    rows = {(r["task_id"], r["episode"]): r for r in log.load()}
    assert len(rows) == 10
    for t in (0, 1):
        assert [rows[t, e]["success"] for e in range(5)] == [True, True, True, False, False]
        assert [rows[t, e]["steps"] for e in range(5)] == [1, 2, 3, 0, 3]  # episode 4 runs out of steps
        assert rows[t, 3]["error"] == "RuntimeError: scene"
    assert max(batches) == 3 and sum(batches) == 2 * (1 + 2 + 3 + 3)
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["task00_ep01_success.gif",
                                                                       "task01_ep01_success.gif"]


def test_policy_is_greedy_predict_action_on_the_protocol_image():
    torch.manual_seed(0)
    config = preset_config("tiny")
    config.norm_stats = {"libero_spatial": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7,
                                                       "mask": [True] * 6 + [False]}}}
    model, tokenizer = OpenVLA.from_config(config).eval(), build_tiny_tokenizer()
    policy = LiberoPolicy(model, tokenizer, "libero_spatial", center_crop=True)
    frames, tasks = [_frame(1), _frame(2)], ["Put the bowl on the plate", "open the drawer"]
    actions = policy(frames, tasks)
    expected = predict_action(model, [policy_image(f, 224, True) for f in frames], tasks, tokenizer, "libero_spatial")
    np.testing.assert_array_equal(actions, env_actions(expected))
    np.testing.assert_array_equal(policy(frames, tasks), actions)  # greedy: no sampling
    assert set(actions[:, 6]) <= {-1.0, 0.0, 1.0}
