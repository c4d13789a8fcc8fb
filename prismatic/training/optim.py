"""AdamW with OpenVLA's two parameter groups, and its learning-rate schedules."""

import math
from typing import List, Tuple

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """No weight decay on biases and 1-D parameters (norms, LayerScale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 and not name.endswith(".bias") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_scheduler(optimizer, kind: str, max_steps: int, warmup_ratio: float):
    """`constant`, or a linear warm-up from 0 followed by a cosine decay to 0 at `max_steps`."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = int(max_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_counts(model: torch.nn.Module) -> Tuple[int, int]:
    params: List[torch.nn.Parameter] = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
