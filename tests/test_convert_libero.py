"""LIBERO HDF5 -> modified-LIBERO RLDS conversion, checked by reading the output back with tfds and RLDSStream."""

import itertools
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from prismatic.util.tf_setup import import_tensorflow
from prismatic.vla.datasets.libero_hdf5 import (
    LiberoFormatError,
    convert_libero_to_rlds,
    instruction_from_filename,
    main,
    noop_keep_mask,
)

SIZE = 32
NAME = "libero_spatial_no_noops"  # registered, so RLDSStream can read it
SCENE_FILE = "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it_demo.hdf5"
PLAIN_FILE = "pick_up_the_black_bowl_next_to_the_plate_demo.hdf5"
INSTRUCTIONS = {
    SCENE_FILE: "turn on the stove and put the moka pot on it",
    PLAIN_FILE: "pick up the black bowl next to the plate",
}

# Each demo: (arm motion scale per step, gripper command per step); scale 0 = still. With the rule
# "drop if ||a[:6]|| < 1e-4 and (no kept step yet or gripper == last kept gripper)":
#                  t: 0     1     2     3     4     5     6      7     8
DEMO_A = ([0.0, 0.3, 0.0, 0.0, 0.0, 0.2, 5e-5, 0.4, 2e-4], [-1, -1, -1, 1, 1, 1, 1, -1, -1])
KEEP_A = [False, True, False, True, False, True, False, True, True]
#   t0 leading still; t2 still, same gripper; t3 still but the gripper closes; t6 below the threshold;
#   t8 just above it.
DEMO_B = ([0.0, 0.0, 0.5, 0.5, 0.0, 0.5], [1, -1, -1, -1, -1, 1])
KEEP_B = [False, False, True, True, False, True]
#   t1 changes the gripper w.r.t. the dropped t0, but there is no kept step yet: dropped.
DEMO_STILL = ([0.0] * 4, [-1] * 4)  # only no-ops: the demo is skipped


def _image(step: int, demo_id: int, camera: int, size: int = SIZE) -> np.ndarray:
    """Smooth, asymmetric picture: a bright square in the top-left corner, gradients that differ per
    step / demo / camera, so each frame and its 180-degree rotation are easy to tell apart."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([40 + 120 * x, 40 + 120 * y, np.full_like(x, 20 + 12 * step + 50 * camera)], axis=-1)
    img[..., 0] += 15 * demo_id
    img[: size // 4, : size // 4] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def _demo_arrays(spec, demo_id: int, size: int = SIZE) -> dict:
    scales, gripper = spec
    steps = len(scales)
    direction = np.array([1.0, -0.5, 0.25, 0.1, -0.2, 0.3]) / np.linalg.norm([1.0, -0.5, 0.25, 0.1, -0.2, 0.3])
    scales = np.array(scales) * (1 + 0.1 * demo_id)  # distinct per demo; the still steps stay below 1e-4
    actions = np.concatenate([np.outer(scales, direction), np.array(gripper, float)[:, None]], axis=1)
    t = np.arange(steps, dtype=np.float64)
    return {
        "actions": actions,
        "obs/agentview_rgb": np.stack([_image(i, demo_id, 0, size) for i in range(steps)]),
        "obs/eye_in_hand_rgb": np.stack([_image(i, demo_id, 1, size) for i in range(steps)]),
        "obs/ee_states": np.stack([t + 10 * k + 0.5 for k in range(6)], axis=1) + 1000 * demo_id,
        "obs/gripper_states": np.stack([0.01 * t, -0.01 * t], axis=1),
        "obs/joint_states": np.stack([np.full(steps, float(demo_id))] + [t * k for k in range(1, 7)], axis=1),
    }


def _write_file(path: Path, demos: dict, drop_key=None) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = "{}"  # extra attributes / keys of the real files are ignored
        for demo, arrays in demos.items():
            group = data.create_group(demo)
            for key, value in arrays.items():
                if (demo, key) != drop_key:
                    group.create_dataset(key, data=value)
            group.create_dataset("rewards", data=np.zeros(len(arrays["actions"])))


def _libero_dir(root: Path) -> tuple[Path, dict]:
    """Two task files; returns the folder and {demo_id: (file name, arrays, keep mask)}."""
    root.mkdir(parents=True, exist_ok=True)
    demos = {
        1: (SCENE_FILE, _demo_arrays(DEMO_A, 1), KEEP_A),
        2: (SCENE_FILE, _demo_arrays(DEMO_B, 2), KEEP_B),
        3: (PLAIN_FILE, _demo_arrays(DEMO_B, 3), KEEP_B),
        4: (PLAIN_FILE, _demo_arrays(DEMO_STILL, 4), [False] * 4),
        5: (PLAIN_FILE, _demo_arrays(DEMO_A, 5), KEEP_A),
    }
    for name in (SCENE_FILE, PLAIN_FILE):
        mine = [d for d in demos if demos[d][0] == name]
        _write_file(root / name, {f"demo_{i}": demos[d][1] for i, d in enumerate(mine)})
    (root / "README.txt").write_text("not a demo file")
    return root, demos


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    source, demos = _libero_dir(tmp / "libero_spatial")
    out = tmp / "rlds"
    report = main(["--libero_hdf5_dir", str(source), "--output_dir", str(out), "--dataset_name", NAME,
                   "--image_size", str(SIZE)])
    return source, out, demos, report


def _read_episodes(builder) -> list:
    import tensorflow_datasets as tfds

    return [{**ep, "steps": list(ep["steps"])} for ep in tfds.as_numpy(builder.as_dataset(split="train"))]


def _stack(steps, *keys):
    def get(step):
        for k in keys:
            step = step[k]
        return step

    return np.stack([get(s) for s in steps])


# ---------------------------------------------------------------------------------------------- rules


def test_noop_rule():
    assert noop_keep_mask(_demo_arrays(DEMO_A, 0)["actions"]).tolist() == KEEP_A
    assert noop_keep_mask(_demo_arrays(DEMO_B, 0)["actions"]).tolist() == KEEP_B
    assert not noop_keep_mask(_demo_arrays(DEMO_STILL, 0)["actions"]).any()
    # The gripper is compared with the last KEPT step, not the previous raw step.
    actions = np.zeros((4, 7))
    actions[:, 6] = [-1, 1, 1, -1]
    actions[0, 0] = 0.5
    assert noop_keep_mask(actions).tolist() == [True, True, False, True]


def test_instruction_from_filename():
    assert instruction_from_filename(Path("/x") / SCENE_FILE) == INSTRUCTIONS[SCENE_FILE]
    assert instruction_from_filename(PLAIN_FILE) == INSTRUCTIONS[PLAIN_FILE]
    assert instruction_from_filename("LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket"
                                     "_demo.hdf5") == "put both the alphabet soup and the tomato sauce in the basket"
    assert instruction_from_filename("STUDY_SCENE10_pick_up_the_book_demo.hdf5") == "pick up the book"
    assert instruction_from_filename("open_the_SCENE1_drawer_demo.hdf5") == "open the SCENE1 drawer"  # not a prefix


# ------------------------------------------------------------------------------------- tfds read-back


def test_report_counts_dropped_steps(converted):
    _, out, demos, report = converted
    read = sum(len(d[2]) for d in demos.values())
    kept = sum(sum(d[2]) for d in demos.values())
    assert report.output == out / NAME / "1.0.0"
    assert (report.num_files, report.num_demos, report.num_episodes, report.empty_demos_skipped) == (2, 5, 4, 1)
    assert (report.steps_read, report.steps_written, report.noops_dropped) == (read, kept, read - kept)
    assert "no-op steps dropped" in report.summary()
    assert sorted(p.name for p in out.iterdir()) == [NAME]  # no stray tfds folders


def test_tfds_read_back_is_exact(converted):
    source, out, demos, _ = converted
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out / NAME / "1.0.0"))
    assert tfds.builder(NAME, data_dir=str(out)).info.splits["train"].num_examples == 4
    episodes = _read_episodes(builder)
    assert len(episodes) == 4
    seen = set()
    for ep in episodes:
        steps = ep["steps"]
        demo_id = int(steps[0]["observation"]["joint_state"][0])
        seen.add(demo_id)
        file_name, arrays, keep = demos[demo_id]
        keep = np.array(keep)
        n = int(keep.sum())
        assert ep["episode_metadata"]["file_path"].decode() == str(source / file_name)
        assert {s["language_instruction"].decode() for s in steps} == {INSTRUCTIONS[file_name]}

        np.testing.assert_array_equal(_stack(steps, "action"), arrays["actions"][keep].astype(np.float32))
        state = np.concatenate([arrays["obs/ee_states"], arrays["obs/gripper_states"]], axis=1)[keep]
        np.testing.assert_array_equal(_stack(steps, "observation", "state"), state.astype(np.float32))
        np.testing.assert_array_equal(_stack(steps, "observation", "joint_state"),
                                      arrays["obs/joint_states"][keep].astype(np.float32))
        assert _stack(steps, "action").dtype == _stack(steps, "observation", "state").dtype == np.float32

        assert _stack(steps, "is_first").tolist() == [True] + [False] * (n - 1)
        assert _stack(steps, "is_last").tolist() == [False] * (n - 1) + [True]
        assert _stack(steps, "is_terminal").tolist() == [False] * (n - 1) + [True]
        assert _stack(steps, "reward").tolist() == [0.0] * (n - 1) + [1.0]
        assert _stack(steps, "discount").tolist() == [1.0] * n

        for key, source_key in (("image", "obs/agentview_rgb"), ("wrist_image", "obs/eye_in_hand_rgb")):
            images = _stack(steps, "observation", key).astype(np.float64)
            originals = arrays[source_key][keep].astype(np.float64)
            assert images.shape == (n, SIZE, SIZE, 3)
            rotated = np.rot90(originals, 2, axes=(1, 2))
            assert np.abs(images - rotated).mean() < 3.0  # JPEG error only
            assert np.abs(images - originals).mean() > 30.0  # the rotation really happened
            assert (images[:, -4:, -4:].mean(-1) > 230).all() and (images[:, :4, :4].mean(-1) < 200).all()  # corner moved
    assert seen == {1, 2, 3, 5}  # demo 4 had only no-op steps

    # The encoded images are JPEG, as in openvla/modified_libero_rlds.
    raw = builder.as_dataset(split="train", decoders={"steps": tfds.decode.SkipDecoding()})
    first = next(iter(raw))["steps"]["observation"]["image"][0].numpy()
    assert first[:2] == b"\xff\xd8"
    assert tf.io.decode_jpeg(first).shape == (SIZE, SIZE, 3)


def test_rlds_stream_reads_the_registered_name(converted):
    _, out, demos, _ = converted
    from prismatic.vla.datasets import RLDSStream

    stream = RLDSStream(out, NAME, image_size=SIZE, shuffle_buffer_size=8)
    kept = [(demos[d][0], demos[d][1]["actions"][np.array(demos[d][2])]) for d in sorted(demos) if any(demos[d][2])]
    raw = np.concatenate([a for _, a in kept]).astype(np.float32)
    assert stream.statistics[NAME]["num_transitions"] == len(raw)
    assert stream.statistics[NAME]["num_trajectories"] == 4

    # numpy twin of LIBERO standardisation (gripper -1/+1 -> 1/0) and BOUNDS_Q99 on the arm dims.
    std = np.concatenate([raw[:, :6], 1.0 - np.clip(raw[:, 6:], 0.0, 1.0)], axis=1).astype(np.float64)
    q01, q99 = np.quantile(std, 0.01, axis=0), np.quantile(std, 0.99, axis=0)
    norm = np.clip(2 * (std - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    expected = np.where(np.array([True] * 6 + [False]), norm, std)
    instruction_of_row = [INSTRUCTIONS[name] for name, actions in kept for _ in actions]

    frames = list(itertools.islice(iter(stream), 40))
    for frame in frames:
        assert frame["image"].shape == (SIZE, SIZE, 3) and frame["dataset_name"] == NAME
        distance = np.abs(expected - frame["action"]).max(axis=1)
        same_task = np.array([i == frame["instruction"] for i in instruction_of_row])
        assert distance[same_task].min() < 1e-5  # a kept action of this task, normalised
    assert {f["instruction"] for f in frames} == set(INSTRUCTIONS.values())


def test_resize_and_no_filtering(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    arrays = _demo_arrays(DEMO_B, 7)
    _write_file(source / PLAIN_FILE, {"demo_0": arrays})
    report = convert_libero_to_rlds(source, tmp_path / "out", "libero_90_no_noops", image_size=48,
                                    filter_noops=False, progress=False)
    assert report.steps_written == report.steps_read == len(DEMO_B[0]) and report.noops_dropped == 0
    assert report.resized_from == {(SIZE, SIZE)}
    import_tensorflow()
    import tensorflow_datasets as tfds

    (ep,) = _read_episodes(tfds.builder_from_directory(str(report.output)))
    images = _stack(ep["steps"], "observation", "image")
    assert images.shape == (len(DEMO_B[0]), 48, 48, 3)
    assert (images[:, -6:, -6:].mean(-1) > 230).all() and (images[:, :6, :6].mean(-1) < 200).all()
    np.testing.assert_array_equal(_stack(ep["steps"], "action"), arrays["actions"].astype(np.float32))


# ------------------------------------------------------------------------------------------- errors


def test_existing_output_is_never_touched(tmp_path):
    source, _ = _libero_dir(tmp_path / "in")
    existing = tmp_path / "out" / NAME
    existing.mkdir(parents=True)
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{NAME} already exists; nothing was written"):
        convert_libero_to_rlds(source, tmp_path / "out", NAME, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [NAME]
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and (existing / "keep.txt").read_text() == "precious"


def test_missing_or_empty_input_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="--libero_hdf5_dir .*does not exist"):
        convert_libero_to_rlds(tmp_path / "nope", tmp_path / "out", NAME, progress=False)
    # The LIBERO download root instead of one suite's folder: say what is there and where the files are.
    (tmp_path / "datasets" / "libero_90").mkdir(parents=True)
    _write_file(tmp_path / "datasets" / "libero_90" / PLAIN_FILE, {"demo_0": _demo_arrays(DEMO_B, 0)})
    (tmp_path / "datasets" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError) as info:
        convert_libero_to_rlds(tmp_path / "datasets", tmp_path / "out", NAME, progress=False)
    message = str(info.value)
    assert "--libero_hdf5_dir" in message and "no *_demo.hdf5 files" in message
    assert "libero_90/" in message and "notes.txt" in message and str(tmp_path / "datasets" / "libero_90") in message
    assert not (tmp_path / "out").exists()


def test_missing_key_names_file_demo_and_key(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    demos = {"demo_0": _demo_arrays(DEMO_B, 0), "demo_1": _demo_arrays(DEMO_B, 1)}
    _write_file(source / SCENE_FILE, demos, drop_key=("demo_1", "obs/joint_states"))
    with pytest.raises(LiberoFormatError) as info:
        convert_libero_to_rlds(source, tmp_path / "out", NAME, progress=False)
    message = str(info.value)
    assert SCENE_FILE in message and "data/demo_1" in message and "'obs/joint_states'" in message
    assert "gripper_states" in message  # what the group does hold
    assert not (tmp_path / "out").exists()

    _write_file(source / SCENE_FILE, {"demo_0": {**demos["demo_0"], "actions": np.zeros((6, 6))}})
    with pytest.raises(LiberoFormatError, match=r"data/demo_0/actions' has shape \(6, 6\)"):
        convert_libero_to_rlds(source, tmp_path / "out", NAME, progress=False)


def test_script_reports_errors_with_the_flag(tmp_path):
    script = Path(__file__).resolve().parents[1] / "vla-scripts" / "convert_libero_to_rlds.py"
    result = subprocess.run(
        [sys.executable, str(script), "--libero_hdf5_dir", str(tmp_path / "missing"), "--output_dir",
         str(tmp_path / "out"), "--dataset_name", NAME],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "error: --libero_hdf5_dir" in result.stderr and "does not exist" in result.stderr


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    from prismatic.vla.datasets import libero_hdf5

    source, _ = _libero_dir(tmp_path / "in")
    real_read, calls = libero_hdf5._read_demo, []

    def flaky_read(path, demo):
        calls.append(demo)
        if len(calls) == 3:
            raise OSError("disk went away")
        return real_read(path, demo)

    monkeypatch.setattr(libero_hdf5, "_read_demo", flaky_read)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk went away"):
        convert_libero_to_rlds(source, tmp_path / "out", NAME, image_size=SIZE, progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither a partial dataset nor tfds' downloads/


def test_only_noops_is_an_error(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    _write_file(source / PLAIN_FILE, {"demo_0": _demo_arrays(DEMO_STILL, 0)})
    with pytest.raises(ValueError, match="--filter_noops: every demo .* no-op steps only"):
        convert_libero_to_rlds(source, tmp_path / "out", NAME, image_size=SIZE, progress=False)
    assert not (tmp_path / "out").exists()
