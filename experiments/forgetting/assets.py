"""The experiment's fixed inputs: four synthetic datasets, a tiny OpenVLA pretrained on the old tasks, its caches.

All four datasets live under one data root with registered names, so the trainer reads each as a mixture:
OLD (A) holds what the pretrained model knows, NEW (B) new tasks (other instructions, colours and actions),
CONFLICT (C) A's instructions and scenes with other actions: there, keeping A and learning C contradict;
SHIFTED is B whose validation episodes are drawn in A's scenes, which only pretraining saw: fine-tuning on it is
fine-tuning on B, and its validation measures whether what was learned on B carries over to A's scenes.
"""

import hashlib
import math
from pathlib import Path

import torch

from prismatic.models import OpenVLA, build_tiny_tokenizer, preset_config, save_pretrained
from prismatic.vla.datasets import RLDSStream, write_synthetic_libero

OLD = "libero_spatial_no_noops"
NEW = "libero_90_no_noops"
CONFLICT = "libero_10_no_noops"
SHIFTED = "libero_goal_no_noops"


def write_datasets(root: Path, num_tasks: int, episodes_per_task: int, steps_per_episode: int, image_size: int,
                   seed: int) -> None:
    """A = tasks 0..n-1, B = tasks n..2n-1, C = tasks 0..n-1 again with action parameters of their own, all laid out
    among 2n scene colours; SHIFTED = B with task n + k's validation episodes in task k's scene. Statistics are
    computed here once, before parallel runs would race to write them."""
    common = dict(num_tasks=num_tasks, episodes_per_task=episodes_per_task, steps_per_episode=steps_per_episode,
                  image_size=image_size, scene_slots=2 * num_tasks)
    write_synthetic_libero(root, name=OLD, seed=seed, **common)
    write_synthetic_libero(root, name=NEW, first_task=num_tasks, seed=seed + 1, **common)
    write_synthetic_libero(root, name=CONFLICT, seed=seed + 2, action_seed=seed + 3, **common)
    write_synthetic_libero(root, name=SHIFTED, first_task=num_tasks, seed=seed + 1,
                           validation_scenes=range(num_tasks), **common)
    for name in (OLD, NEW, CONFLICT, SHIFTED):
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


def _weight_files(checkpoint: Path) -> list:
    return sorted(checkpoint.glob("*.safetensors"))


def weights_sha256(checkpoint: Path) -> str:
    """Of the checkpoint's weight files: equal exactly when a regenerated model is the recorded one."""
    digest = hashlib.sha256()
    for path in _weight_files(checkpoint):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def weight_distance(a: Path, b: Path) -> float:
    """||w_a - w_b|| over every floating tensor of two checkpoints of one model."""
    from safetensors.torch import load_file

    wa, wb = ({k: v for p in _weight_files(c) for k, v in load_file(p).items()} for c in (a, b))
    return math.sqrt(sum(float(((wa[k].double() - wb[k].double()) ** 2).sum())
                         for k in wa if wa[k].is_floating_point()))
