"""The synthetic writer produces real TFDS files in the modified-LIBERO RLDS schema."""

import numpy as np
import pytest

from prismatic.util.tf_setup import import_tensorflow
from prismatic.vla.datasets.synthetic import main, validation_file_paths, write_synthetic_libero

SMALL = dict(num_tasks=2, episodes_per_task=2, steps_per_episode=10, image_size=64)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds")
    return root, write_synthetic_libero(root, **SMALL)


def _episodes(root, name="libero_90_no_noops"):
    import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(root))  # the upstream way of finding <root>/<name>/<version>/
    episodes = [{**ep, "steps": list(ep["steps"])} for ep in tfds.as_numpy(builder.as_dataset(split="train"))]
    return builder, episodes


def test_layout_and_feature_spec(written):
    root, path = written
    assert path == root / "libero_90_no_noops" / "1.0.0"
    assert (path / "dataset_info.json").is_file() and (path / "features.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["libero_90_no_noops"]  # no stray tfds folders

    builder, episodes = _episodes(root)
    assert builder.info.splits["train"].num_examples == 4
    assert set(builder.info.features.keys()) == {"steps", "episode_metadata"}
    steps_spec = builder.info.features["steps"].feature
    assert set(steps_spec.keys()) == {
        "observation", "action", "discount", "reward", "is_first", "is_last", "is_terminal", "language_instruction"
    }
    assert set(steps_spec["observation"].keys()) == {"image", "wrist_image", "state", "joint_state"}

    steps = {}
    for step in episodes[0]["steps"]:
        for key, value in step.items():
            steps.setdefault(key, []).append(value)
    obs = {k: np.stack([o[k] for o in steps["observation"]]) for k in steps["observation"][0]}
    assert obs["image"].shape == obs["wrist_image"].shape == (10, 64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (10, 8) and obs["state"].dtype == np.float32
    assert obs["joint_state"].shape == (10, 7) and obs["joint_state"].dtype == np.float32
    action = np.stack(steps["action"])
    assert action.shape == (10, 7) and action.dtype == np.float32
    assert steps["is_first"][0] and not any(steps["is_first"][1:])
    assert steps["is_last"][-1] and steps["is_terminal"][-1] and steps["reward"][-1] == 1.0
    assert isinstance(episodes[0]["episode_metadata"]["file_path"], bytes)


def test_content_is_libero_like_and_task_specific(written):
    _, episodes = _episodes(written[0])
    by_instruction = {}
    for ep in episodes:
        actions = np.stack([s["action"] for s in ep["steps"]])
        assert set(np.unique(actions[:, -1])) <= {-1.0, 1.0}
        assert np.abs(actions[:, :6]).max() <= 0.9375
        instructions = {s["language_instruction"] for s in ep["steps"]}
        assert len(instructions) == 1
        image = ep["steps"][0]["observation"]["image"]
        by_instruction.setdefault(instructions.pop(), []).append((actions, image.reshape(-1, 3).mean(0)))
    assert len(by_instruction) == 2
    (ep00, ep01), (ep10, _) = by_instruction.values()
    # Episodes of one task share a trajectory (up to small noise); the two tasks differ in actions and colour.
    assert np.abs(ep00[0] - ep01[0]).max() < 0.2
    assert np.abs(ep00[0] - ep10[0]).max() > 0.2
    assert np.abs(ep00[1] - ep10[1]).max() > 30


def test_deterministic_per_seed_and_refuses_to_overwrite(tmp_path, written):
    first = write_synthetic_libero(tmp_path / "a", **SMALL)
    again = write_synthetic_libero(tmp_path / "b", **SMALL)
    other = write_synthetic_libero(tmp_path / "c", **SMALL, seed=1)

    def records(path):
        return b"".join(p.read_bytes() for p in sorted(path.glob("*.tfrecord*")))

    assert records(first) == records(again) == records(written[1])
    assert records(first) != records(other)
    with pytest.raises(FileExistsError, match="already exists"):
        write_synthetic_libero(tmp_path / "a", **SMALL)


def test_cli(tmp_path, capsys):
    main(["--data_root_dir", str(tmp_path), "--name", "libero_goal_no_noops", "--num_tasks", "1",
          "--episodes_per_task", "1", "--steps_per_episode", "3", "--image_size", "32"])
    assert (tmp_path / "libero_goal_no_noops" / "1.0.0" / "dataset_info.json").is_file()
    assert str(tmp_path / "libero_goal_no_noops" / "1.0.0") in capsys.readouterr().out


def test_validation_scenes_redraw_only_the_held_out_episodes(tmp_path):
    """A dataset whose validation episodes are drawn in other scenes: the training split and every action are
    those of the same dataset without them, and the held-out pictures take the other scene's colour."""
    args = dict(SMALL, num_tasks=2, episodes_per_task=10, steps_per_episode=2, first_task=2, scene_slots=4)
    write_synthetic_libero(tmp_path, name="libero_90_no_noops", **args)
    write_synthetic_libero(tmp_path, name="libero_goal_no_noops", validation_scenes=(0, 1), **args)
    held_out = validation_file_paths(tmp_path / "libero_90_no_noops" / "1.0.0")
    assert held_out == validation_file_paths(tmp_path / "libero_goal_no_noops" / "1.0.0")
    assert 0 < len(held_out) < 20

    def by_path(name):
        return {ep["episode_metadata"]["file_path"].decode(): ep for ep in _episodes(tmp_path, name)[1]}

    plain, moved = by_path("libero_90_no_noops"), by_path("libero_goal_no_noops")
    assert plain.keys() == moved.keys()
    for path, ep in plain.items():
        images = [np.stack([s["observation"]["image"] for s in e["steps"]]) for e in (ep, moved[path])]
        actions = [np.stack([s["action"] for s in e["steps"]]) for e in (ep, moved[path])]
        np.testing.assert_array_equal(actions[0], actions[1])
        if path in held_out:  # tasks 2, 3 drawn in scenes 0, 1: another background colour
            assert np.abs(images[0].mean((0, 1, 2)) - images[1].mean((0, 1, 2))).max() > 30
        else:
            np.testing.assert_array_equal(images[0], images[1])
