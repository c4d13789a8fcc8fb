"""Which RLDS datasets and mixtures exist, and how to read each one.

Adding your own dataset is one entry: `DATASETS["my_robot"] = DatasetConfig(name="my_robot", ...)`
with the observation keys of its RLDS files and a `standardize` function that brings its actions to
the EEF_POS convention (6 relative end-effector dims, then the gripper in [0, 1], 1 = open). Every
dataset is also a one-dataset mixture, so `--vla.data_mix my_robot` then works.

Nothing here imports TensorFlow: the checks run before any heavy import, so a wrong flag fails fast.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

EEF_POS_NORMALIZATION_MASK = [True] * 6 + [False]  # the gripper stays raw in [0, 1]
EEF_POS_ABSOLUTE_MASK = [False] * 6 + [True]


@dataclass(frozen=True)
class DatasetConfig:
    """How to read one RLDS dataset stored at `<data_root_dir>/<name>/<version>/`.

    `standardize` receives one trajectory (the dict of its steps, tensors with a leading time axis)
    and returns it with EEF_POS actions and the observation keys named below. Changing it (its
    source) or `state_obs_keys` invalidates the cached statistics.
    """

    name: str
    image_obs_keys: dict = field(default_factory=lambda: {"primary": "image", "secondary": None, "wrist": None})
    state_obs_keys: list = field(default_factory=list)
    standardize: Optional[Callable[[dict], dict]] = None
    action_normalization_mask: list = field(default_factory=lambda: list(EEF_POS_NORMALIZATION_MASK))
    absolute_action_mask: list = field(default_factory=lambda: list(EEF_POS_ABSOLUTE_MASK))
    version: str = "1.0.0"


def libero_standardize(traj: dict) -> dict:
    """LIBERO stores the gripper as -1 open / +1 close; EEF_POS wants 1 open / 0 close."""
    import tensorflow as tf

    gripper = 1.0 - tf.clip_by_value(traj["action"][:, -1:], 0.0, 1.0)
    traj["action"] = tf.concat([traj["action"][:, :6], gripper], axis=-1)
    state = traj["observation"]["state"]
    traj["observation"]["EEF_state"] = state[:, :6]
    traj["observation"]["gripper_state"] = state[:, -2:]
    return traj


def _libero(name: str) -> DatasetConfig:
    return DatasetConfig(
        name=name,
        image_obs_keys={"primary": "image", "secondary": None, "wrist": "wrist_image"},
        state_obs_keys=["EEF_state", None, "gripper_state"],
        standardize=libero_standardize,
    )


LIBERO_EVAL_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")

DATASETS: dict[str, DatasetConfig] = {
    name: _libero(name)
    for suite in (*LIBERO_EVAL_SUITES, "libero_90")
    for name in (f"{suite}_no_noops", suite)
}

MIXTURES: dict[str, list[tuple[str, float]]] = {
    **{name: [(name, 1.0)] for name in DATASETS},
    "libero_90": [("libero_90_no_noops", 1.0)],  # the short name means the no-noops data, as for eval
    "libero_4_suites": [(f"{suite}_no_noops", 1.0) for suite in LIBERO_EVAL_SUITES],
}


def resolve_mixture(data_mix: str) -> list[tuple[str, float]]:
    """Return the (dataset name, weight) pairs of a mixture; any registered dataset is its own mixture."""
    if data_mix in MIXTURES:
        return list(MIXTURES[data_mix])
    if data_mix in DATASETS:  # registered after import, e.g. by a user's script
        return [(data_mix, 1.0)]
    raise ValueError(
        f"--vla.data_mix {data_mix!r} is not a known mixture or dataset. "
        f"Known mixtures: {sorted(MIXTURES)}. "
        "To train on your own RLDS dataset, add a DatasetConfig to DATASETS in prismatic/vla/datasets/registry.py."
    )


def check_data_root(data_root_dir, data_mix: str) -> None:
    """Fail before TensorFlow starts if a dataset of the mix is not at `<data_root_dir>/<name>/<version>/`."""
    root = Path(data_root_dir).expanduser()
    for name, _ in resolve_mixture(data_mix):
        expected = root / name / DATASETS[name].version / "dataset_info.json"
        if expected.is_file():
            continue
        if not root.is_dir():
            found = f"{root} does not exist"
        elif (root / name).is_dir():
            found = f"{root / name} holds {sorted(p.name for p in (root / name).iterdir())}"
        else:
            folders = sorted(p.name for p in root.iterdir() if p.is_dir())
            found = f"{root} holds the folders {folders}"
        raise FileNotFoundError(
            f"--data_root_dir {str(data_root_dir)!r}: dataset {name!r} (from --vla.data_mix {data_mix!r}) not found. "
            f"Expected {expected}; found: {found}. --data_root_dir must be the folder that contains one folder per "
            "RLDS dataset (e.g. the download of openvla/modified_libero_rlds). For a small test dataset run "
            "`python -m prismatic.vla.datasets.synthetic --data_root_dir DIR --name NAME`."
        )
