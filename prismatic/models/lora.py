"""LoRA adapters on OpenVLA (built with peft) and the merged export in the plain OpenVLA layout.

The merge is computed from a state dict (`W + alpha/r * B @ A` per adapted layer), so exporting
never reloads the base model and never modifies the weights being trained; it works the same on a
full state dict gathered from a sharded model.
"""

from typing import Dict, List, Optional

import torch
from torch import nn

ADAPTER = "default"
LORA_MARKER = ".lora_"


def lora_targets(model: nn.Module, spec: str) -> List[str]:
    """Module names to adapt: "all-linear" = every Linear of the vision backbones, projector and LLM,
    never the output head; otherwise comma-separated name suffixes (e.g. "q_proj,v_proj")."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    if spec == "all-linear":
        return linears
    suffixes = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not chosen:
        raise ValueError(f"--vla.lora_target_modules {spec!r} matches no Linear layer (lm_head is never adapted); "
                         f"examples of names: {linears[:3]} ... {linears[-3:]}")
    return chosen


def add_lora(model: nn.Module, rank: int, alpha: int, dropout: float, targets: List[str]) -> nn.Module:
    """Inject adapters in place; only the adapters remain trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        init_lora_weights="gaussian")
    model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(LORA_MARKER in name)
        if LORA_MARKER in name:
            p.data = p.data.float()  # trained weights stay fp32 whatever the frozen base's dtype
    return model


def adapter_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if LORA_MARKER in k}


def merged_state_dict(state_dict: Dict[str, torch.Tensor], scaling: float,
                      dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The OpenVLA-layout weights of the adapted model: base + scaling * B @ A, computed in float32."""
    out = {}
    for key, value in state_dict.items():
        if LORA_MARKER in key:
            continue
        name = key.replace(".base_layer.", ".")
        if key.endswith(".base_layer.weight"):
            prefix = key[: -len(".base_layer.weight")]
            a = state_dict[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
            b = state_dict[f"{prefix}.lora_B.{ADAPTER}.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(dtype or value.dtype)
        out[name] = value if dtype is None or not value.is_floating_point() else value.to(dtype)
    return out
