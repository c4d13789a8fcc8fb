"""Fused DINOv2 + SigLIP vision backbone.

Both ViTs see the same image (normalised their own way, stacked on channels, DINO first). OpenVLA uses the
output of each ViT's second-to-last block, without the final norm and without prefix (CLS/register) tokens,
and concatenates the two feature sets per patch. The blocks after that one are never run (they get no
gradient upstream either), but they stay in the module so the checkpoint layout is the published one.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from prismatic.models.config import PATCH_SIZE, VLAModelConfig

# Tiny stand-ins with the same token layout as the real backbones (256 patches at 224 px).
TINY_VITS: dict[str, dict] = {
    # DINOv2-like: CLS + 4 registers, position embeddings on patches only, LayerScale (`ls1.gamma`).
    "tiny_vit_dinov2_reg4": dict(
        embed_dim=32, depth=3, num_heads=2, reg_tokens=4, no_embed_class=True, init_values=1.0
    ),
    # SigLIP-like: no prefix tokens, attention-pool head.
    "tiny_vit_siglip": dict(embed_dim=32, depth=3, num_heads=2, class_token=False, global_pool="map"),
}


def build_vit(name: str, img_size: int, act_layer: str | None = None) -> VisionTransformer:
    """A randomly initialised ViT (weights come from a checkpoint): one of `TINY_VITS`, else timm's `name`."""
    overrides = {} if act_layer is None else {"act_layer": act_layer}
    if name in TINY_VITS:
        kwargs = dict(img_size=img_size, patch_size=PATCH_SIZE, num_classes=0, **TINY_VITS[name], **overrides)
        return VisionTransformer(**kwargs)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **overrides)


def penultimate_patch_features(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, num_patches, D]: second-to-last block output, no final norm, prefix tokens dropped."""
    (features,) = vit.forward_intermediates(
        images, indices=[len(vit.blocks) - 2], norm=False, stop_early=True, intermediates_only=True, output_fmt="NLC"
    )
    return features


class FusedVisionBackbone(nn.Module):
    def __init__(self, config: VLAModelConfig):
        super().__init__()
        if not config.use_fused_vision_backbone or len(config.timm_model_ids) != 2:
            raise ValueError("only the fused two-backbone (DINOv2 + SigLIP) vision stack is supported")
        dino_id, siglip_id = config.timm_model_ids
        self.featurizer = build_vit(dino_id, config.image_sizes[0], config.timm_override_act_layers[0])
        self.fused_featurizer = build_vit(siglip_id, config.image_sizes[1], config.timm_override_act_layers[1])

    @property
    def embed_dim(self) -> int:
        return self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 6, H, W] (DINO channels first) -> [B, num_patches, d_dino + d_siglip]."""
        dino_pixels, siglip_pixels = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat(
            [
                penultimate_patch_features(self.featurizer, dino_pixels),
                penultimate_patch_features(self.fused_featurizer, siglip_pixels),
            ],
            dim=2,
        )
