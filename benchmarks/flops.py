"""Model FLOPs of a training pass, counted by torch, and the accelerator peaks that turn them into MFU.

Model FLOPs follow the MFU convention: the matrix products the result needs, forward and backward, with
no recomputation. `torch.utils.flop_counter.FlopCounterMode` counts every matrix product, convolution and
attention kernel that actually runs (elementwise work, norms, softmax and the loss are not counted, as in
the convention), so the count is made with activation checkpointing paused. Two adjustments to torch's
table: the CPU attention kernels are added (torch lists only the CUDA ones), and an attention backward
counts its four products (2x the forward) rather than torch's five, whose extra one is the fused kernel
recomputing the scores. With LoRA the count stays right as it is: the frozen base gets no weight
gradient, so no product for one runs or is counted.

A 7B step on a whole batch does not fit without checkpointing, so one row is counted and multiplied by the
number of rows like it. Every row of a padded batch has the same length; what can differ per row is how
many positions are supervised (only those go through lm_head), so rows are grouped by that count and one
row of each group is counted.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from prismatic.models.batching import IGNORE_INDEX

aten = torch.ops.aten

# Dense bf16 tensor-core peaks (no sparsity), by a pattern on torch.cuda.get_device_name().
PEAK_BF16_FLOPS = (
    (r"H100.*(HBM3|SXM)", 989.4e12),
    (r"H100.*PCIe", 756e12),
    (r"H200(?!.*NVL)", 989.4e12),
    (r"A100", 312e12),
)


def peak_flops(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """FLOP/s the MFU is a fraction of: `override_tflops` (TFLOP/s) if given, else the table's entry for
    the device's name, else None (an unknown device, or a CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def _attention_forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """q [b, h, s_q, d], k [b, h_kv, s_k, d], v [b, h_kv, s_k, d_v]: q k^T and (scores) v, for every query head."""
    b, h, s_q, d = q
    s_k, d_v = k[2], v[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _attention_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """grad_out v^T, scores^T grad_out, grad_scores k, grad_scores^T q: twice the forward's products."""
    return 2 * _attention_forward(q, k, v)


MODEL_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
    aten._scaled_dot_product_flash_attention_backward: _attention_backward,
    aten._scaled_dot_product_efficient_attention_backward: _attention_backward,
    aten._scaled_dot_product_cudnn_attention_backward: _attention_backward,
}


def counted_flops(fn: Callable[[], None]) -> int:
    """FLOPs of the matrix products `fn` runs, forward and backward, in the model-FLOPs convention."""
    with FlopCounterMode(display=False, custom_mapping=MODEL_FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()


def rows_alike(batch: dict) -> Dict[int, List[int]]:
    """Row indices grouped by their supervised-position count (0 for a batch without labels)."""
    n = batch["input_ids"].shape[0]
    labels = batch.get("labels")
    counts = [0] * n if labels is None else (labels != IGNORE_INDEX).sum(dim=1).tolist()
    groups: Dict[int, List[int]] = {}
    for row, count in enumerate(counts):
        groups.setdefault(count, []).append(row)
    return groups


def row_slice(batch: dict, row: int) -> dict:
    """The one-row batch of `row`: every tensor with a row per sample sliced, anything else as it is."""
    n = batch["input_ids"].shape[0]
    return {k: v[row:row + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v
            for k, v in batch.items()}


@contextmanager
def no_recomputation(objective, gradient_checkpointing: bool):
    """Forward passes inside keep their activations, however checkpointing was switched on: the built-in
    checkpointing is paused; one-pass CRaFT's (each unit's forward wrapped in its own checkpoint call, which
    the pause does not reach) is swapped for the built-in one meanwhile and put back after."""
    model = objective.model
    rewrapped = gradient_checkpointing and objective.split is not None
    if rewrapped:
        model.gradient_checkpointing_enable()
    try:
        with model.activation_checkpointing_paused():
            yield
    finally:
        if rewrapped:
            model.gradient_checkpointing_enable(context_fn=objective.split.recompute_context)


def pass_flops(objective, loss_fn: Callable[[dict], Callable], batch: dict, clear: Callable[[], None],
               gradient_checkpointing: bool) -> int:
    """Model FLOPs of one forward + backward of `loss_fn(batch)` (objective.action or objective.retention),
    counted one row per group of `rows_alike` and multiplied by the group's size; gradients are cleared with
    `clear` after each pass. Sharded, every rank runs the same passes (FSDP's collectives must match) and
    gets its own batch's count."""
    groups = rows_alike(batch)
    if dist.is_initialized():
        n = torch.tensor([len(groups), -len(groups)], device=batch["input_ids"].device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        if n[0] != -n[1]:
            raise RuntimeError(f"ranks' batches have between {-int(n[1])} and {int(n[0])} groups of rows with "
                               "the same supervised-position count: FLOPs can only be counted on equal numbers")
    total = 0
    with no_recomputation(objective, gradient_checkpointing):
        for rows in groups.values():
            one_row = row_slice(batch, rows[0])
            total += len(rows) * counted_flops(lambda: loss_fn(one_row)().backward())
            clear()
    return total
