"""A frozen base in 8 or 4 bits under LoRA adapters (bitsandbytes): the 7B base in ~8 / ~4 GB.

As OpenVLA's quantized LoRA recipe: every Linear layer except the projector and the output head is
replaced by its bitsandbytes counterpart (int8, or NF4 computing in `compute_dtype`); norms,
embeddings and the adapters keep their precision.
"""

import importlib.util

import torch
from torch import nn


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _quantized(linear: nn.Linear, kind: str, compute_dtype: torch.dtype) -> nn.Linear:
    import bitsandbytes as bnb

    weight, device = linear.weight.data, linear.weight.device
    bias = linear.bias is not None
    if kind == "4bit":
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                quant_type="nf4")
        new.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, quant_type="nf4")
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        new.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    if bias:
        new.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes when the weight is moved


def quantize_base(model: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace the base's Linear layers in place by `kind` ("8bit" or "4bit") ones; returns how many."""
    if kind not in ("8bit", "4bit"):
        raise ValueError(f"quantization must be '8bit' or '4bit'; found {kind!r}")
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not n.endswith("lm_head") and not n.startswith("projector")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quantized(getattr(parent, child), kind, compute_dtype))
    return len(names)


def keep_quantized_in_train_mode(model: nn.Module) -> None:
    """After `model.eval()`: bitsandbytes' 4-bit layers repack their weights in place for CPU inference when
    they run in eval mode without gradients (and cannot for layers narrower than a quantization block), which
    would change the base that training continues on. They have no dropout, so train mode computes the same."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.train()
