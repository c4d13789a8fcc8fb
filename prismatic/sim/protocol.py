"""OpenVLA's LIBERO evaluation protocol: the constants and the two conversions between policy and simulator.

Everything here follows `experiments/robot/libero/run_libero_eval.py` of OpenVLA, whose published success rates
are the ones users compare with; none of it needs the simulator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from prismatic.util.tf_setup import import_tensorflow
from prismatic.vla.datasets.rlds import AUG_CROP_SCALE

# Policy steps per episode, after the settling steps.
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SUITES = tuple(MAX_STEPS)
SETTLE_STEPS = 10  # objects fall into place while the robot holds still with the gripper open
SETTLE_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
CAMERA_SIZE = 256  # the rendered agent-view image; the policy sees it at the model's image size
ENV_SEED = 0


def policy_image(frame: np.ndarray, size: int, center_crop: bool) -> np.ndarray:
    """Agent-view frame [H, W, 3] uint8 -> the image the policy sees, made as the training images were.

    The LIBERO demonstrations were stored upside down and rotated when converted; their frames went through a
    JPEG file and TF's lanczos3 resize. A checkpoint trained with random crops of 90% area sees the centre crop
    of that area, resized back (bilinear).
    """
    tf = import_tensorflow()
    upright = np.ascontiguousarray(frame[::-1, ::-1])
    image = tf.io.decode_image(tf.io.encode_jpeg(upright), channels=3, expand_animations=False)
    image = tf.image.resize(image, (size, size), method="lanczos3", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if center_crop:
        side = float(np.sqrt(AUG_CROP_SCALE))
        margin = (1.0 - side) / 2
        box = [[margin, margin, margin + side, margin + side]]
        crop = tf.image.crop_and_resize(tf.image.convert_image_dtype(image, tf.float32)[None], box, [0], (size, size))
        image = tf.image.convert_image_dtype(tf.clip_by_value(crop[0], 0.0, 1.0), tf.uint8, saturate=True)
    return image.numpy()


def env_actions(actions: np.ndarray) -> np.ndarray:
    """Policy actions [B, 7] (gripper in [0, 1], 1 = close) -> LIBERO's (gripper -1 = close, +1 = open)."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[:, -1] = -np.sign(2.0 * out[:, -1] - 1.0)
    return out


def resolve_unnorm_key(task_suite: str, norm_stats: dict[str, Any] | None, unnorm_key: str | None) -> str:
    """The dataset whose statistics un-normalise actions: the given key, else the suite's dataset, as trained
    on (`<suite>_no_noops` when only that one is in the checkpoint)."""
    keys = sorted(norm_stats or {})
    candidates = [unnorm_key] if unnorm_key else [task_suite, f"{task_suite}_no_noops"]
    for key in candidates:
        if key in keys:
            return key
    flag = "--unnorm_key" if unnorm_key else f"--task_suite {task_suite} (or pass --unnorm_key)"
    raise ValueError(f"{flag}: the checkpoint has no action statistics for {' or '.join(candidates)}; "
                     f"it has statistics for {keys}")
