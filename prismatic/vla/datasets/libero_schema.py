"""The modified-LIBERO RLDS schema (as in `openvla/modified_libero_rlds`) and a writer for it.

Shared by the synthetic dataset writer and the LIBERO HDF5 converter, so both produce exactly the
features OpenVLA's LIBERO datasets have:

    steps: Dataset of
        observation/image        JPEG, [S, S, 3] uint8 (agentview camera, rotated 180 degrees)
        observation/wrist_image  JPEG, [S, S, 3] uint8 (eye-in-hand camera, rotated 180 degrees)
        observation/state        float32 [8]: end-effector position (3), axis-angle (3), gripper qpos (2)
        observation/joint_state  float32 [7]
        action                   float32 [7]: 6 relative end-effector dims, gripper (-1 open, +1 close)
        discount, reward         float32 (reward 1 on the last step)
        is_first, is_last, is_terminal  bool
        language_instruction     Text
    episode_metadata/file_path   Text

TensorFlow (and tensorflow_datasets) are only imported when a function here is called.
"""

import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from prismatic.util.tf_setup import import_tensorflow

VERSION = "1.0.0"


def libero_features(image_size: int):
    """The `tfds.features.FeaturesDict` of one modified-LIBERO episode with square images of `image_size`."""
    import_tensorflow()
    import tensorflow_datasets as tfds

    image = tfds.features.Image(shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="jpeg")
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(
                {
                    "observation": tfds.features.FeaturesDict(
                        {
                            "image": image,
                            "wrist_image": image,
                            "state": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                            "joint_state": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                        }
                    ),
                    "action": tfds.features.Tensor(shape=(7,), dtype=np.float32),
                    "discount": tfds.features.Scalar(dtype=np.float32),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    "language_instruction": tfds.features.Text(),
                }
            ),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }
    )


def write_libero_rlds(
    data_root_dir,
    name: str,
    episodes: Iterable,
    image_size: int,
    description: Optional[str] = None,
) -> Path:
    """Write the `(key, episode)` pairs of `episodes` as the train split of `<data_root_dir>/<name>/1.0.0/`.

    `episodes` may be a generator: tfds consumes it one episode at a time and keeps at most ~1 GB of
    encoded examples in memory before spilling to temporary files. Episodes are shuffled by a hash of
    their key (deterministic), like a tfds builder, so that `train[:95%]` is a random 95% of them.

    The caller checks that the target does not exist. If writing fails, whatever this call created
    under `<data_root_dir>` is removed again; so is the empty `downloads/` folder tfds always makes.
    """
    import_tensorflow()
    import tensorflow_datasets as tfds

    root = Path(data_root_dir)
    created = [p for p in (root / name, root / "downloads") if not p.exists()]
    try:
        tfds.dataset_builders.store_as_tfds_dataset(
            name=name,
            version=VERSION,
            data_dir=str(root),
            features=libero_features(image_size),
            split_datasets={"train": episodes},
            description=description,
        )
    except BaseException:
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if root / "downloads" in created:
        shutil.rmtree(root / "downloads", ignore_errors=True)
    return root / name / VERSION
