"""OpenVLA model: config, fused vision backbone, projector, VLA wrapper, preprocessing, checkpoints."""

from prismatic.util.torch_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before timm or transformers import torchvision; the rest of prismatic starts fast

from prismatic.models.checkpoint import (  # noqa: E402
    CheckpointFileError,
    check_weight_files,
    load_pretrained,
    save_pretrained,
)
from prismatic.models.config import PRESETS, VLAModelConfig, load_dataset_statistics, preset_config  # noqa: E402
from prismatic.models.processor import ImageProcessor  # noqa: E402
from prismatic.models.projector import FusedMLPProjector  # noqa: E402
from prismatic.models.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402
from prismatic.models.vision import FusedVisionBackbone  # noqa: E402
from prismatic.models.vla import IGNORE_INDEX, OpenVLA, VLAOutput  # noqa: E402

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "CheckpointFileError",
    "FusedMLPProjector",
    "FusedVisionBackbone",
    "ImageProcessor",
    "OpenVLA",
    "VLAModelConfig",
    "VLAOutput",
    "build_tiny_tokenizer",
    "check_weight_files",
    "load_dataset_statistics",
    "load_pretrained",
    "load_tokenizer",
    "preset_config",
    "save_pretrained",
]
