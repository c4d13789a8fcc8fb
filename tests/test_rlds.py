"""RLDSStream against independent numpy computations on a small synthetic LIBERO dataset."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prismatic.util.tf_setup import import_tensorflow
from prismatic.vla.datasets import rlds, statistics
from prismatic.vla.datasets.registry import DATASETS, MIXTURES, check_data_root, libero_standardize, resolve_mixture
from prismatic.vla.datasets.rlds import RLDSStream
from prismatic.vla.datasets.statistics import compute_or_load_statistics, normalize_bounds_q99
from prismatic.vla.datasets.synthetic import write_synthetic_libero

NAME = "libero_90_no_noops"
SMALL = dict(num_tasks=2, episodes_per_task=3, steps_per_episode=10, image_size=64)  # 6 episodes: 5 train, 1 val


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds")
    write_synthetic_libero(root, **SMALL)
    return root


@pytest.fixture(scope="module")
def raw_actions(root):
    """All raw actions of the dataset, read with plain tfds (not through the code under test)."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder(NAME, data_dir=str(root))
    return np.concatenate(
        [np.stack([s["action"] for s in ep["steps"]]) for ep in tfds.as_numpy(builder.as_dataset(split="train"))]
    )


def _reference_normalized(raw: np.ndarray) -> np.ndarray:
    """numpy twin of LIBERO standardisation + BOUNDS_Q99 with the EEF_POS mask, stats from all raw actions."""
    std = np.concatenate([raw[:, :6], 1.0 - np.clip(raw[:, 6:], 0.0, 1.0)], axis=1).astype(np.float64)
    q01, q99 = np.quantile(std, 0.01, axis=0), np.quantile(std, 0.99, axis=0)
    normalized = np.clip(2 * (std - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    normalized[:, std.min(0) == std.max(0)] = 0.0
    return np.where(np.array([True] * 6 + [False]), normalized, std)


def _take(stream, n):
    return list(itertools.islice(iter(stream), n))


def _stream(root, **kwargs):
    return RLDSStream(root, NAME, shuffle_buffer_size=kwargs.pop("shuffle_buffer_size", 32), **kwargs)


def _action_ids(frames):
    return {f["action"].tobytes() for f in frames}


def test_frames_have_upstream_types_and_shapes(root):
    frames = _take(_stream(root), 20)
    for f in frames:
        assert f["image"].shape == (224, 224, 3) and f["image"].dtype == np.uint8
        assert f["action"].shape == (7,) and f["action"].dtype == np.float32
        assert f["instruction"] in {"put the black bowl on the plate", "open the top drawer of the cabinet"}
        assert f["dataset_name"] == NAME
        assert f["image"].flags.writeable and f["action"].flags.writeable  # torch.from_numpy without warnings
    assert len(_take(_stream(root, image_size=96), 1)[0]["image"]) == 96


def test_actions_are_standardized_and_bounds_q99_normalized(root, raw_actions):
    stream = _stream(root)
    expected = _reference_normalized(raw_actions)
    frames = _take(stream, 200)
    for f in frames:
        nearest = np.abs(expected - f["action"]).max(axis=1).argmin()
        np.testing.assert_allclose(f["action"], expected[nearest], atol=1e-5)
        # Gripper convention: raw -1 (open) -> 1.0, raw +1 (close) -> 0.0, not normalised.
        assert f["action"][6] == {-1.0: 1.0, 1.0: 0.0}[float(raw_actions[nearest, 6])]
    assert {float(f["action"][6]) for f in frames} == {0.0, 1.0}
    assert np.abs(np.stack([f["action"] for f in frames])).max() <= 1.0


def test_statistics_match_numpy_and_upstream_format(root, raw_actions):
    stats = _stream(root).statistics[NAME]
    std = np.concatenate([raw_actions[:, :6], 1.0 - np.clip(raw_actions[:, 6:], 0.0, 1.0)], axis=1)
    for key, fn in {"mean": np.mean, "std": np.std, "max": np.max, "min": np.min}.items():
        np.testing.assert_allclose(stats["action"][key], fn(std, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["action"]["q01"], np.quantile(std, 0.01, axis=0), atol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(std, 0.99, axis=0), atol=1e-6)
    assert stats["action"]["mask"] == [True] * 6 + [False]
    # Upstream fine-tuning loads no proprio and writes the statistics of zeros of the action's width (7).
    zeros = [0.0] * 7
    assert stats["proprio"] == {k: zeros for k in ("mean", "std", "max", "min", "q01", "q99")}
    assert stats["num_transitions"] == 60 and stats["num_trajectories"] == 6
    json.dumps(stats)  # ready for run_dir/dataset_statistics.json


def test_statistics_are_cached_next_to_the_dataset(root, monkeypatch):
    first = _stream(root).statistics
    cached = list((root / NAME / "1.0.0").glob("dataset_statistics_*.json"))
    assert len(cached) == 1 and len(cached[0].stem.split("_")[-1]) == 64
    mtime = cached[0].stat().st_mtime_ns

    def fail(*_):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(rlds, "_compute_statistics", fail)
    assert _stream(root).statistics == first
    assert cached[0].stat().st_mtime_ns == mtime


def test_statistics_cached_in_another_layout_are_not_reused(root, monkeypatch):
    builder_dir = root / NAME / "1.0.0"
    filename = statistics.statistics_filename(builder_dir, DATASETS[NAME])
    monkeypatch.setattr(statistics, "STATISTICS_LAYOUT", "proprio = LIBERO state")
    assert statistics.statistics_filename(builder_dir, DATASETS[NAME]) != filename


def test_statistics_fall_back_to_user_cache_when_dataset_dir_is_read_only(tmp_path, monkeypatch):
    builder_dir = tmp_path / "ds" / "1.0.0"
    builder_dir.mkdir(parents=True)
    (builder_dir / "dataset_info.json").write_text("{}")
    monkeypatch.setattr(statistics, "FALLBACK_CACHE_DIR", tmp_path / "cache")
    real_write = statistics._write_atomically

    def read_only(path, text):
        if path.parent == builder_dir:
            raise PermissionError(path)
        real_write(path, text)

    monkeypatch.setattr(statistics, "_write_atomically", read_only)
    calls = []
    compute = lambda: calls.append(1) or {"num_transitions": 1}  # noqa: E731
    config = DATASETS[NAME]
    assert compute_or_load_statistics(builder_dir, config, compute) == {"num_transitions": 1}
    assert compute_or_load_statistics(builder_dir, config, compute) == {"num_transitions": 1}
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("dataset_statistics_*.json"))) == 1


def test_normalize_bounds_q99_matches_numpy_twin():
    tf = import_tensorflow()
    stats = {"q01": [-1.0, 0.0, 2.0, 0.0], "q99": [1.0, 2.0, 2.0, 1.0],
             "min": [-2.0, 0.0, 2.0, 0.0], "max": [2.0, 3.0, 2.0, 1.0]}
    mask = [True, True, True, False]
    x = np.array([[0.5, 3.0, 2.0, 0.7], [-5.0, 1.0, 2.0, 0.0]], np.float32)
    got = normalize_bounds_q99(tf.constant(x), stats, mask).numpy()
    np.testing.assert_allclose(got, [[0.5, 1.0, 0.0, 0.7], [-1.0, 0.0, 0.0, 0.0]], atol=1e-6)


def test_libero_standardize_gripper_and_state():
    tf = import_tensorflow()
    traj = {
        "action": tf.constant([[0.1] * 6 + [-1.0], [0.2] * 6 + [1.0]]),
        "observation": {"state": tf.reshape(tf.range(16, dtype=tf.float32), (2, 8))},
    }
    out = libero_standardize(traj)
    np.testing.assert_allclose(out["action"].numpy()[:, 6], [1.0, 0.0])
    np.testing.assert_allclose(out["observation"]["EEF_state"].numpy(), [list(range(6)), list(range(8, 14))])
    np.testing.assert_allclose(out["observation"]["gripper_state"].numpy(), [[6, 7], [14, 15]])


def test_deterministic_per_seed(root):
    a = _take(_stream(root, image_aug=True), 30)
    b = _take(_stream(root, image_aug=True), 30)
    c = _take(_stream(root, image_aug=True, seed=8), 30)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["action"], y["action"])
    assert [x["action"].tobytes() for x in a] != [x["action"].tobytes() for x in c]


def test_augmentation_changes_pixels_only(root):
    plain = _take(_stream(root), 10)
    augmented = _take(_stream(root, image_aug=True), 10)
    for p, a in zip(plain, augmented):
        assert a["image"].shape == p["image"].shape and a["image"].dtype == np.uint8
        np.testing.assert_array_equal(a["action"], p["action"])  # same frames, same order
    changes = [np.abs(p["image"].astype(int) - a["image"].astype(int)).mean() for p, a in zip(plain, augmented)]
    assert np.mean(changes) > 2


def test_splits_and_rank_shards_are_disjoint(root):
    train = _action_ids(_take(_stream(root), 300))
    val = _action_ids(_take(_stream(root, train=False), 100))
    assert len(train) == 50 and len(val) == 10 and not train & val  # 5 train episodes, 1 validation episode

    shards = [_action_ids(_take(_stream(root, rank=r, world_size=2), 300)) for r in (0, 1)]
    assert len(shards[0]) == 30 and len(shards[1]) == 20  # episodes 0-2 and 3-4
    assert not shards[0] & shards[1] and shards[0] | shards[1] == train
    with pytest.raises(ValueError, match="rank 5 of world_size=6 gets none"):
        _stream(root, rank=5, world_size=6)


def test_mixture_samples_by_weight_times_size(root, tmp_path, monkeypatch):
    write_synthetic_libero(tmp_path, name="libero_goal_no_noops", num_tasks=1, episodes_per_task=2,
                           steps_per_episode=10, image_size=32)
    write_synthetic_libero(tmp_path, name=NAME, **SMALL)
    monkeypatch.setitem(MIXTURES, "test_mix", [(NAME, 1.0), ("libero_goal_no_noops", 2.0)])
    stream = RLDSStream(tmp_path, "test_mix", shuffle_buffer_size=8)
    names = [f["dataset_name"] for f in _take(stream, 600)]
    # Weights x sizes: 1 x 60 vs 2 x 20 transitions -> 60 % vs 40 % of the frames.
    assert 0.33 < names.count("libero_goal_no_noops") / len(names) < 0.47
    assert len(stream) == 50 and len(_stream(root)) == 60


def test_unknown_mix_names_flag_value_and_choices(root):
    with pytest.raises(ValueError) as err:
        RLDSStream(root, "libero_91")
    message = str(err.value)
    assert "--vla.data_mix" in message and "'libero_91'" in message and "libero_4_suites" in message
    assert resolve_mixture("libero_90") == [("libero_90_no_noops", 1.0)]
    assert [n for n, _ in resolve_mixture("libero_4_suites")] == [
        "libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops"
    ]


def test_missing_dataset_names_flag_expected_path_and_what_was_found(root, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        RLDSStream(tmp_path / "nowhere", "libero_90")
    message = str(err.value)
    assert "--data_root_dir" in message and "does not exist" in message
    assert str(tmp_path / "nowhere" / NAME / "1.0.0" / "dataset_info.json") in message

    with pytest.raises(FileNotFoundError) as err:
        check_data_root(root, "libero_4_suites")
    assert f"holds the folders ['{NAME}']" in str(err.value) and "libero_spatial_no_noops/1.0.0" in str(err.value)

    (tmp_path / "libero_10_no_noops" / "2.0.0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds \['2.0.0'\]"):
        check_data_root(tmp_path, "libero_10_no_noops")


def test_registry_libero_configs():
    for suite in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"):
        for name in (suite, f"{suite}_no_noops"):
            config = DATASETS[name]
            assert config.name == name and config.version == "1.0.0"
            assert config.image_obs_keys == {"primary": "image", "secondary": None, "wrist": "wrist_image"}
            assert config.state_obs_keys == ["EEF_state", None, "gripper_state"]
            assert config.action_normalization_mask == [True] * 6 + [False]
            assert config.absolute_action_mask == [False] * 6 + [True]
            # "libero_90" is the mixture of the no-noops data (the name the LIBERO-90 eval uses).
            assert MIXTURES[name] == [(f"{suite}_no_noops" if name == "libero_90" else name, 1.0)]


def test_tensorflow_is_imported_lazily_quietly_and_off_the_gpu():
    """Preflight checks run before TensorFlow is imported (a wrong flag fails in seconds); TF then logs nothing."""
    code = (
        "import os, sys, prismatic.vla.datasets\n"
        "assert 'tensorflow' not in sys.modules\n"
        "from prismatic.util.tf_setup import import_tensorflow\n"
        "tf = import_tensorflow()\n"
        "assert tf.config.get_visible_devices('GPU') == []\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '3' and os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'\n"
        "tf.constant(1.0) + 1.0\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr and "cpu_feature_guard" not in result.stderr, result.stderr
