"""Write a small, learnable dataset in the modified-LIBERO RLDS format, for tests and smoke runs.

The files are real TFDS files with the same features as `openvla/modified_libero_rlds`, so the whole
pipeline (reading, statistics, normalisation, training) runs without downloading 10 GB. A tiny model
can learn it: each task has its own instruction, colour and band position, a marker moves across the
image with the step, and the actions are a smooth task-specific function of the step.

    python -m prismatic.vla.datasets.synthetic --data_root_dir data/rlds
"""

import argparse
import colorsys
import shutil
from pathlib import Path
from typing import Optional, Sequence, Set

import numpy as np

from prismatic.vla.datasets.libero_schema import write_libero_rlds
from prismatic.vla.libero_tasks import INSTRUCTIONS


def _instruction(task: int) -> str:
    base = INSTRUCTIONS[task % len(INSTRUCTIONS)]
    return base if task < len(INSTRUCTIONS) else f"{base} in scene {task // len(INSTRUCTIONS) + 1}"


def _task_colour(task: int, scene_slots: int) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(task / scene_slots, 0.7, 0.8)
    return (np.array(rgb) * 255).astype(np.float32)


def _render(scene: int, scene_slots: int, progress: float, size: int, rng: np.random.Generator,
            wrist: bool) -> np.ndarray:
    """The scene's colour as background with a dark band at a scene-specific height, plus a white marker whose
    position tells the step."""
    image = np.broadcast_to(_task_colour(scene, scene_slots), (size, size, 3)).copy()
    band = int((scene + 0.25) / scene_slots * size)
    image[band : band + max(size // (2 * scene_slots), 1)] *= 0.3
    image += rng.integers(-10, 11, size=image.shape, dtype=np.int16)  # texture; cheap to draw
    side = max(size // 8, 2)
    x = int(progress * (size - side))
    y = size - side - x if wrist else size // 2 - side // 2
    image[y : y + side, x : x + side] = 255.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _episode(task: int, scene: int, scene_slots: int, steps: int, size: int, rng: np.random.Generator,
             task_params: dict):
    """One episode of `task` drawn in `scene`: arm actions a_d(t) = amp_d sin(2 pi f_d t + phase_d) + noise,
    t in [0, 1]; the gripper opens (-1) until a task-specific time, then closes (+1)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float64)
    amp, freq, phase, close_at = (task_params[k] for k in ("amp", "freq", "phase", "close_at"))
    arm = amp * np.sin(2 * np.pi * freq * t[:, None] + phase) + rng.normal(0.0, 0.02, size=(steps, 6))
    gripper = np.where(t < close_at, -1.0, 1.0)[:, None]
    action = np.concatenate([np.clip(arm, -0.9375, 0.9375), gripper], axis=1).astype(np.float32)

    eef = np.cumsum(action[:, :6] * 0.01, axis=0)
    finger = np.where(gripper > 0, 0.0, 0.04)
    state = np.concatenate([eef, finger, -finger], axis=1).astype(np.float32)
    joints = (0.3 * np.sin(np.outer(t, np.arange(1, 8)) + task)).astype(np.float32)

    return {
        "observation": {
            "image": [_render(scene, scene_slots, p, size, rng, wrist=False) for p in t],
            "wrist_image": [_render(scene, scene_slots, p, size, rng, wrist=True) for p in t],
            "state": state,
            "joint_state": joints,
        },
        "action": action,
        "discount": np.ones(steps, np.float32),
        "reward": (np.arange(steps) == steps - 1).astype(np.float32),
        "is_first": np.arange(steps) == 0,
        "is_last": np.arange(steps) == steps - 1,
        "is_terminal": np.arange(steps) == steps - 1,
        "language_instruction": [_instruction(task)] * steps,
    }


def write_synthetic_libero(
    data_root_dir,
    name: str = "libero_90_no_noops",
    num_tasks: int = 4,
    episodes_per_task: int = 3,
    steps_per_episode: int = 20,
    image_size: int = 256,
    seed: int = 0,
    first_task: int = 0,
    scene_slots: Optional[int] = None,
    action_seed: Optional[int] = None,
    validation_scenes: Optional[Sequence[int]] = None,
) -> Path:
    """Write `<data_root_dir>/<name>/1.0.0/` (same content for the same arguments) and return that path.

    Several datasets can split one task space, for continual-learning experiments: tasks `first_task ..
    first_task + num_tasks - 1` (the task number picks instruction, colour and band), laid out among
    `scene_slots` colours and band heights (default: as many as the tasks written), with their action
    parameters drawn from `action_seed` when given (the same scenes with other actions), else from `seed`.
    `validation_scenes[k]`: the scene slot that task `first_task + k` is drawn in within the validation split
    (the episodes the training pipeline holds out), to measure generalisation to scenes the tasks were never
    shown in; everything else (the training split, every action) is what the same call without it writes.
    Refuses to write over an existing dataset folder, so a real download is never clobbered.
    """
    target = Path(data_root_dir) / name / "1.0.0"
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or pick another --data_root_dir / --name")
    scene_slots = scene_slots or first_task + num_tasks
    if first_task < 0 or scene_slots < first_task + num_tasks:
        raise ValueError(f"tasks {first_task}..{first_task + num_tasks - 1} need first_task >= 0 and scene_slots >= "
                         f"{first_task + num_tasks}; found first_task {first_task}, scene_slots {scene_slots}")
    if validation_scenes is not None and (len(validation_scenes) != num_tasks
                                          or not all(0 <= s < scene_slots for s in validation_scenes)):
        raise ValueError(f"validation_scenes must hold {num_tasks} slots in [0, {scene_slots}); "
                         f"found {list(validation_scenes)}")

    def write(moved: Set[str]) -> None:
        """The dataset, with the episodes whose file path is in `moved` drawn in their validation scene. The
        scene changes no random draw, so the other episodes come out byte for byte as without it."""
        rng = np.random.default_rng(seed)
        param_rng = rng if action_seed is None else np.random.default_rng(action_seed)
        params = [
            {
                "amp": param_rng.uniform(0.3, 0.8, size=6),
                "freq": param_rng.uniform(0.3, 1.2, size=6),
                "phase": param_rng.uniform(0, 2 * np.pi, size=6),
                "close_at": param_rng.uniform(0.3, 0.7),
            }
            for _ in range(num_tasks)
        ]

        def episodes():
            for k, task in enumerate(range(first_task, first_task + num_tasks)):
                for ep in range(episodes_per_task):
                    path = f"synthetic/{_instruction(task).replace(' ', '_')}_demo.hdf5/demo_{ep}"
                    scene = validation_scenes[k] if path in moved else task
                    steps = _episode(task, scene, scene_slots, steps_per_episode, image_size, rng, params[k])
                    yield f"task{task}_ep{ep}", {"steps": steps, "episode_metadata": {"file_path": path}}

        write_libero_rlds(data_root_dir, name, episodes(), image_size)

    write(set())
    if validation_scenes is not None:  # which episodes are held out follows from their keys, known once written
        moved = validation_file_paths(target)
        shutil.rmtree(target)
        write(moved)
    return target


def validation_file_paths(dataset_dir) -> Set[str]:
    """`episode_metadata/file_path` of each episode in the split the training pipeline validates on."""
    from prismatic.util.tf_setup import import_tensorflow
    from prismatic.vla.datasets.rlds import _split

    import_tensorflow()
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(dataset_dir))
    episodes = builder.as_dataset(split=_split(builder, train=False), decoders={"steps": tfds.decode.SkipDecoding()})
    return {p.decode() for p in tfds.as_numpy(episodes.map(lambda ep: ep["episode_metadata"]["file_path"]))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root_dir", required=True, help="folder that will hold <name>/1.0.0/")
    parser.add_argument("--name", default="libero_90_no_noops")
    parser.add_argument("--num_tasks", type=int, default=4)
    parser.add_argument("--episodes_per_task", type=int, default=3)
    parser.add_argument("--steps_per_episode", type=int, default=20)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_synthetic_libero(**vars(args)))


if __name__ == "__main__":
    main()
