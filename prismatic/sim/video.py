"""Rollout videos as animated GIFs (Pillow only: no video codec to install)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    """uint8 [H, W, 3] frames as a looping GIF."""
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
