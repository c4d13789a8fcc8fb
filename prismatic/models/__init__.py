"""OpenVLA model: config, fused vision backbone, projector, VLA wrapper, preprocessing, checkpoints."""

from prismatic.models.checkpoint import (
    CheckpointFileError,
    check_weight_files,
    load_dataset_statistics,
    load_pretrained,
    save_pretrained,
)
from prismatic.models.config import PRESETS, VLAModelConfig, preset_config
from prismatic.models.processor import ImageProcessor
from prismatic.models.projector import FusedMLPProjector
from prismatic.models.tokenizer import build_tiny_tokenizer, load_tokenizer
from prismatic.models.vision import FusedVisionBackbone
from prismatic.models.vla import IGNORE_INDEX, OpenVLA, VLAOutput

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
