"""The experiment's fixed inputs: three synthetic datasets, a tiny OpenVLA pretrained on the old tasks, its cache.

All three datasets live under one data root with registered names, so the trainer reads each as a mixture:
OLD (A) holds what the pretrained model knows, NEW (B) new tasks (other instructions, colours and actions),
CONFLICT (C) A's instructions and scenes with other actions: there, keeping A and learning C contradict.
"""

from pathlib import Path

import torch

from prismatic.models import OpenVLA, build_tiny_tokenizer, preset_config, save_pretrained
from prismatic.vla.datasets import RLDSStream, write_synthetic_libero

OLD = "libero_spatial_no_noops"
NEW = "libero_90_no_noops"
CONFLICT = "libero_10_no_noops"


def write_datasets(root: Path, num_tasks: int, episodes_per_task: int, steps_per_episode: int, image_size: int,
                   seed: int) -> None:
    """A = tasks 0..n-1, B = tasks n..2n-1, C = tasks 0..n-1 again with action parameters of their own; all laid out
    among 2n scene colours. Statistics are computed here once, before parallel runs would race to write them."""
    common = dict(num_tasks=num_tasks, episodes_per_task=episodes_per_task, steps_per_episode=steps_per_episode,
                  image_size=image_size, scene_slots=2 * num_tasks)
    write_synthetic_libero(root, name=OLD, seed=seed, **common)
    write_synthetic_libero(root, name=NEW, first_task=num_tasks, seed=seed + 1, **common)
    write_synthetic_libero(root, name=CONFLICT, seed=seed + 2, action_seed=seed + 3, **common)
    for name in (OLD, NEW, CONFLICT):
        RLDSStream(root, name, shuffle_buffer_size=1)


def write_random_checkpoint(path: Path, seed: int) -> None:
    """The tiny preset, randomly initialised: what pretraining on A starts from."""
    torch.manual_seed(seed)
    save_pretrained(OpenVLA.from_config(preset_config("tiny")), path, tokenizer=build_tiny_tokenizer())


def final_checkpoint(run_dir: Path) -> Path:
    """The newest finished `step-*` checkpoint of a trainer run."""
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if not p.name.endswith(".partial"))
    if not steps:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no finished step-* checkpoint")
    return steps[-1]
