"""Image preprocessing for the fused backbone: one resize, two normalisations, stacked DINO first.

Resizing goes through PIL's bicubic filter on the uint8 image, as upstream does (torchvision's resize on a PIL
image), so pixel values match the ones the released weights were trained on. Both backbones use the same size
with "resize-naive", so the image is resized once and normalised twice.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from prismatic.models.config import VLAModelConfig

DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class ImageProcessor:
    def __init__(self, config: VLAModelConfig):
        if config.image_resize_strategy != "resize-naive":
            raise ValueError(
                f"only image_resize_strategy 'resize-naive' is supported, got {config.image_resize_strategy!r}"
            )
        if len(set(config.image_sizes)) != 1:
            raise ValueError(f"both backbones must take the same image size, got {config.image_sizes}")
        self.size = config.image_sizes[0]
        self._mean = torch.tensor(DINO_MEAN + SIGLIP_MEAN).view(6, 1, 1)
        self._std = torch.tensor(DINO_STD + SIGLIP_STD).view(6, 1, 1)

    def _one(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
            image = Image.fromarray(image)
        image = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255)).permute(2, 0, 1)
        return (pixels.repeat(2, 1, 1) - self._mean) / self._std

    def __call__(self, images: np.ndarray | Image.Image | list) -> torch.Tensor:
        """uint8 [H, W, 3] or a PIL image -> [6, S, S]; uint8 [B, H, W, 3] or a list of images -> [B, 6, S, S]."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            return self._one(images)
        return torch.stack([self._one(image) for image in images])
