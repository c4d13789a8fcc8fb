"""Image preprocessing for the fused backbone: one resize, two normalisations, stacked DINO first.

Resizing goes through PIL's bicubic filter on the uint8 image, as upstream does (torchvision's resize on a PIL
image, which antialiases), so pixel values match the ones the released weights were trained on. Both backbones
take the same size, so the image is resized once and normalised twice.

- "resize-naive" (openvla-7b): resize to S x S, ignoring the aspect ratio.
- "letterbox": pad to a square with the DINO mean colour (the HF processor uses the first backbone's mean for
  both), resize the shorter side to S, center-crop S x S (which only trims an odd-padding pixel).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prismatic.models.config import VLAModelConfig

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
LETTERBOX_FILL = tuple(int(m * 255) for m in DINO_MEAN)  # (123, 116, 103)
RESIZE_STRATEGIES = ("resize-naive", "letterbox")


def letterbox(image: Image.Image) -> Image.Image:
    """Pad both sides of the shorter dimension by floor(difference / 2) (as upstream: an odd difference leaves
    the result one pixel short of square)."""
    w, h = image.size
    pad_x, pad_y = (max(w, h) - w) // 2, (max(w, h) - h) // 2
    padded = Image.new("RGB", (w + 2 * pad_x, h + 2 * pad_y), LETTERBOX_FILL)
    padded.paste(image, (pad_x, pad_y))
    return padded


def resize_shorter_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) (shorter side to `size`, longer side truncated) then CenterCrop(size)."""
    w, h = image.size
    scale_w, scale_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((scale_w, scale_h), Image.Resampling.BICUBIC)
    left, top = int(round((scale_w - size) / 2.0)), int(round((scale_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class ImageProcessor:
    def __init__(self, config: VLAModelConfig):
        if config.image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"image_resize_strategy must be one of {RESIZE_STRATEGIES}, got {config.image_resize_strategy!r}"
            )
        if len(set(config.image_sizes)) != 1:
            raise ValueError(f"both backbones must take the same image size, got {config.image_sizes}")
        self.size = config.image_sizes[0]
        self.letterbox = config.image_resize_strategy == "letterbox"
        self._mean = torch.tensor(DINO_MEAN + SIGLIP_MEAN).view(6, 1, 1)
        self._std = torch.tensor(DINO_STD + SIGLIP_STD).view(6, 1, 1)

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.letterbox:
            return resize_shorter_center_crop(letterbox(image), self.size)
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def _one(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
            image = Image.fromarray(image)
        image = self._resize(image.convert("RGB"))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255)).permute(2, 0, 1)
        return (pixels.repeat(2, 1, 1) - self._mean) / self._std

    def __call__(self, images: np.ndarray | Image.Image | list) -> torch.Tensor:
        """uint8 [H, W, 3] or a PIL image -> [6, S, S]; uint8 [B, H, W, 3] or a list of images -> [B, 6, S, S]."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            return self._one(images)
        return torch.stack([self._one(image) for image in images])
