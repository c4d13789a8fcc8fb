"""Write a small, learnable dataset in the modified-LIBERO RLDS format, for tests and smoke runs.

The files are real TFDS files with the same features as `openvla/modified_libero_rlds`, so the whole
pipeline (reading, statistics, normalisation, training) runs without downloading 10 GB. A tiny model
can learn it: each task has its own instruction, colour and band position, a marker moves across the
image with the step, and the actions are a smooth task-specific function of the step.

    python -m prismatic.vla.datasets.synthetic --data_root_dir data/rlds
"""

import argparse
import colorsys
from pathlib import Path

import numpy as np

from prismatic.vla.datasets.libero_schema import write_libero_rlds
from prismatic.vla.libero_tasks import INSTRUCTIONS


def _instruction(task: int) -> str:
    base = INSTRUCTIONS[task % len(INSTRUCTIONS)]
    return base if task < len(INSTRUCTIONS) else f"{base} in scene {task // len(INSTRUCTIONS) + 1}"


def _task_colour(task: int, num_tasks: int) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(task / num_tasks, 0.7, 0.8)
    return (np.array(rgb) * 255).astype(np.float32)


def _render(task: int, num_tasks: int, progress: float, size: int, rng: np.random.Generator, wrist: bool) -> np.ndarray:
    """Task colour as background with a dark band at a task-specific height, plus a white marker whose
    position tells the step."""
    image = np.broadcast_to(_task_colour(task, num_tasks), (size, size, 3)).copy()
    band = int((task + 0.25) / num_tasks * size)
    image[band : band + max(size // (2 * num_tasks), 1)] *= 0.3
    image += rng.integers(-10, 11, size=image.shape, dtype=np.int16)  # texture; cheap to draw
    side = max(size // 8, 2)
    x = int(progress * (size - side))
    y = size - side - x if wrist else size // 2 - side // 2
    image[y : y + side, x : x + side] = 255.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _episode(task: int, num_tasks: int, steps: int, size: int, rng: np.random.Generator, task_params: dict):
    """One episode: arm actions a_d(t) = amp_d sin(2 pi f_d t + phase_d) + noise, t in [0, 1]; the gripper
    opens (-1) until a task-specific time, then closes (+1)."""
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
            "image": [_render(task, num_tasks, p, size, rng, wrist=False) for p in t],
            "wrist_image": [_render(task, num_tasks, p, size, rng, wrist=True) for p in t],
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
) -> Path:
    """Write `<data_root_dir>/<name>/1.0.0/` (same content for the same arguments) and return that path.

    Refuses to write over an existing dataset folder, so a real download is never clobbered.
    """
    target = Path(data_root_dir) / name / "1.0.0"
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or pick another --data_root_dir / --name")
    rng = np.random.default_rng(seed)
    params = [
        {
            "amp": rng.uniform(0.3, 0.8, size=6),
            "freq": rng.uniform(0.3, 1.2, size=6),
            "phase": rng.uniform(0, 2 * np.pi, size=6),
            "close_at": rng.uniform(0.3, 0.7),
        }
        for _ in range(num_tasks)
    ]

    def episodes():
        for task in range(num_tasks):
            for ep in range(episodes_per_task):
                steps = _episode(task, num_tasks, steps_per_episode, image_size, rng, params[task])
                path = f"synthetic/{_instruction(task).replace(' ', '_')}_demo.hdf5/demo_{ep}"
                yield f"task{task}_ep{ep}", {"steps": steps, "episode_metadata": {"file_path": path}}

    write_libero_rlds(data_root_dir, name, episodes(), image_size)
    return target


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
