"""Image preprocessing for the fused backbone: one resize, two normalisations, stacked DINO first.

Resizing goes through PIL's bicubic filter on the uint8 image, as upstream does (torchvision's resize on a PIL
image, which antialiases), so pixel values match the ones the released weights were trained on. Both backbones
take the same size, so the image is resized once and normalised twice.

- "resize-naive" (openvla-7b): resize to S x S, ignoring the aspect ratio.
- "letterbox": pad to a square with the DINO mean colour (the HF processor uses the first backbone's mean for
  both), resize the shorter side to S, center-crop S x S (which only trims an odd-padding pixel).

A checkpoint's `preprocessor_config.json` decides the normalisation, as in upstream's HF processor: the values
applied are its `tvf_normalize_params`, which for the released openvla-7b are bfloat16-rounded ImageNet
statistics, not the float32 ones of its `means`/`stds` keys. Without that file, the float32 values below apply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from prismatic.models.config import VLAModelConfig, read_config

PREPROCESSOR_NAME = "preprocessor_config.json"
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
LETTERBOX_FILL = tuple(int(m * 255) for m in DINO_MEAN)  # (123, 116, 103)
RESIZE_STRATEGIES = ("resize-naive", "letterbox")
BICUBIC = 3  # torchvision's InterpolationMode.BICUBIC as stored in `tvf_resize_params`


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
    """`means`/`stds`: per backbone (DINO, SigLIP), the normalisation applied after scaling pixels to [0, 1]."""

    def __init__(
        self,
        config: VLAModelConfig,
        means: Sequence[Sequence[float]] = (DINO_MEAN, SIGLIP_MEAN),
        stds: Sequence[Sequence[float]] = (DINO_STD, SIGLIP_STD),
    ):
        if config.image_resize_strategy not in RESIZE_STRATEGIES:
            raise ValueError(
                f"image_resize_strategy must be one of {RESIZE_STRATEGIES}, got {config.image_resize_strategy!r}"
            )
        if len(set(config.image_sizes)) != 1:
            raise ValueError(f"both backbones must take the same image size, got {config.image_sizes}")
        self.size = config.image_sizes[0]
        self.resize_strategy = config.image_resize_strategy
        self.letterbox = config.image_resize_strategy == "letterbox"
        self.means = [[float(x) for x in m] for m in means]
        self.stds = [[float(x) for x in s] for s in stds]
        if [len(m) for m in self.means] != [3, 3] or [len(s) for s in self.stds] != [3, 3]:
            raise ValueError(f"expected 3 means and 3 stds per backbone (DINO, SigLIP), got {means} and {stds}")
        # numpy, not torch: a model built under torch.device("meta") builds its processor there too
        self._mean = np.array(self.means[0] + self.means[1], dtype=np.float32).reshape(6, 1, 1)
        self._std = np.array(self.stds[0] + self.stds[1], dtype=np.float32).reshape(6, 1, 1)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, config: VLAModelConfig | None = None) -> ImageProcessor:
        """The processor a checkpoint folder prescribes: its preprocessor_config.json's `tvf_normalize_params`
        when it has that file, else the default normalisation. `config` defaults to the folder's config.json."""
        if config is None:
            config = read_config(checkpoint_dir)
        path = Path(checkpoint_dir) / PREPROCESSOR_NAME
        if not path.is_file():
            return cls(config)
        try:
            saved = json.loads(path.read_text())
            normalize = saved["tvf_normalize_params"]
            means, stds = [p["mean"] for p in normalize], [p["std"] for p in normalize]
            strategy, sizes = saved["image_resize_strategy"], [s[-1] for s in saved["input_sizes"]]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise ValueError(
                f"{path} is not an OpenVLA image processor config: expected JSON with tvf_normalize_params "
                f"([{{mean, std}}] per backbone), image_resize_strategy and input_sizes ({type(e).__name__}: {e})"
            ) from None
        if (strategy, sizes) != (config.image_resize_strategy, list(config.image_sizes)):
            raise ValueError(
                f"{path} (image_resize_strategy {strategy!r}, sizes {sizes}) disagrees with the model config "
                f"(image_resize_strategy {config.image_resize_strategy!r}, image_sizes {config.image_sizes})"
            )
        try:
            return cls(config, means, stds)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: tvf_normalize_params: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """preprocessor_config.json in the layout of upstream's HF PrismaticImageProcessor, so OpenVLA's own
        remote-code processor reads it too; `means`/`stds` equal what is applied."""
        size = [self.size, self.size]
        resize = {"antialias": True, "interpolation": BICUBIC, "max_size": None,
                  "size": size if not self.letterbox else self.size}  # fmt: skip
        return {
            "auto_map": {
                "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                "AutoProcessor": "processing_prismatic.PrismaticProcessor",
            },
            "image_processor_type": "PrismaticImageProcessor",
            "processor_class": "PrismaticProcessor",
            "use_fused_vision_backbone": True,
            "image_resize_strategy": self.resize_strategy,
            "input_sizes": [[3, *size], [3, *size]],
            "interpolations": ["bicubic", "bicubic"],
            "means": self.means,
            "stds": self.stds,
            "tvf_do_letterbox": self.letterbox,
            "tvf_letterbox_fill": list(LETTERBOX_FILL) if self.letterbox else None,
            "tvf_resize_params": [resize, resize],
            "tvf_crop_params": [{"output_size": size}, {"output_size": size}],
            "tvf_normalize_params": [{"mean": m, "std": s, "inplace": False} for m, s in zip(self.means, self.stds)],
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        path = Path(folder) / PREPROCESSOR_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

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
        pixels = (np.asarray(image, dtype=np.float32) / np.float32(255)).transpose(2, 0, 1)
        return torch.from_numpy((np.concatenate([pixels, pixels]) - self._mean) / self._std)

    def __call__(self, images: np.ndarray | Image.Image | list) -> torch.Tensor:
        """uint8 [H, W, 3] or a PIL image -> [6, S, S]; uint8 [B, H, W, 3] or a list of images -> [B, 6, S, S]."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            return self._one(images)
        return torch.stack([self._one(image) for image in images])
