"""Rollout videos as animated GIFs (Pillow only: no video codec to install)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 10, every: int = 1) -> Path:
    """Every `every`-th frame (uint8 [H, W, 3]) and always the last one, looped."""
    if not frames:
        raise ValueError(f"no frames to write to {path}")
    chosen = frames[::every] if (len(frames) - 1) % every == 0 else [*frames[::every], frames[-1]]
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in chosen]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
