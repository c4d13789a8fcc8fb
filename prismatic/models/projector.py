"""Projector from fused vision features to the LLM's embedding space (OpenVLA's "fused-gelu-mlp")."""

from __future__ import annotations

import torch
from torch import nn


class FusedMLPProjector(nn.Module):
    """fc1 (d_vision -> 4 d_vision), GELU, fc2 (-> d_llm), GELU, fc3 (d_llm -> d_llm); names as in the HF export."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features)))))
