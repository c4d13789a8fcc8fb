"""OpenVLA's freeze stages: which parameters a run trains."""

from typing import List

import torch

from prismatic.conf.vla import TRAIN_STAGES, VLAConfig
from prismatic.models.lora import add_lora, lora_targets


def last_llm_layer(model) -> List[torch.nn.Module]:
    """OpenVLA's "last layer": the token embeddings, the last decoder layer and the output head."""
    lm = model.language_model
    return [lm.model.embed_tokens, lm.model.layers[-1], lm.lm_head]


def apply_train_stage(model, stage: str) -> List[torch.nn.Parameter]:
    """Set requires_grad per stage and return the trainable parameters in a fixed order."""
    if stage not in TRAIN_STAGES:
        raise ValueError(f"--vla.train_stage must be one of {list(TRAIN_STAGES)}; found {stage!r}")
    model.requires_grad_(stage in ("vla-full-train", "vla-train"))
    if stage == "vla-train":
        model.vision_backbone.requires_grad_(False)
    if stage == "vla-sandwich-train":
        model.vision_backbone.requires_grad_(True)
        model.projector.requires_grad_(True)
    if stage in ("vla-sandwich-train", "vla-last-layer-train"):
        for module in last_llm_layer(model):
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def make_trainable(model, vla: VLAConfig):
    """What the run trains: LoRA adapters on a frozen base (returned: the model with them), or OpenVLA's stage."""
    if vla.use_lora:
        return add_lora(model, vla.lora_rank, vla.resolved_lora_alpha, vla.lora_dropout,
                        lora_targets(model, vla.lora_target_modules))
    apply_train_stage(model, vla.train_stage)
    return model
