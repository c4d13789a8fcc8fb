"""The dry run's pre-flight report: what was checked, what the first steps did, what a full run costs."""

import math
import statistics
from typing import List

import torch


def _fmt_range(values) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return f"{values[0]:.4g} -> {values[-1]:.4g}" if values else "n/a"


def dry_run_report(cfg, plan, records: List[dict], total_params: int, trainable_params: int,
                   device: torch.device) -> str:
    accum = plan.grad_accumulation_steps
    global_batch = cfg.vla.per_device_batch_size * accum * plan.world_size
    step_times = [r["step_time_s"] for r in records[1:]] or [r["step_time_s"] for r in records]
    median = statistics.median(step_times)
    skipped = sum(r["skipped"] for r in records)
    lines = [
        "=" * 72,
        "CRaFT pre-flight report (dry run: nothing was written)",
        "=" * 72,
        f"data     : --vla.data_mix {cfg.vla.data_mix} -> {', '.join(f'{n} (w={w})' for n, w in plan.mixture)}",
        f"           under --data_root_dir {cfg.data_root_dir}",
        f"model    : --pretrained_checkpoint {cfg.pretrained_checkpoint}",
        f"           hidden size {plan.model_config.hidden_size}, {plan.model_config.num_hidden_layers} layers, "
        f"{total_params:,} parameters, {trainable_params:,} trainable ({cfg.vla.train_stage})",
        f"batch    : {cfg.vla.per_device_batch_size} per device x {plan.world_size} process(es) x {accum} "
        f"accumulation = {global_batch} per step; compute {cfg.vla.compute_dtype} on {device}",
    ]
    if cfg.craft.enabled:
        meta = plan.cache_meta
        lines += [
            f"anchors  : {meta['num_anchors']} in {cfg.craft.anchor_cache_dir} — {_signal(meta)}, "
            f"dtype {meta['dtype']}, hidden_dim {meta['hidden_dim']}: match the run",
            f"craft    : retention_mode {cfg.craft.retention_mode}, loss {cfg.craft.loss_type}, "
            f"epsilon {cfg.craft.epsilon} ({cfg.craft.epsilon_schedule}), lambda_init {cfg.craft.lambda_init}, "
            f"lambda_lr {cfg.craft.lambda_lr}, {cfg.craft.anchor_batch_size} anchors per micro-batch",
            f"L_ret    : {_fmt_range([r['L_ret'] for r in records])} (epsilon {records[-1]['epsilon']})",
            f"lambda   : {_fmt_range([r['lambda'] for r in records])}",
            f"grad_cos : {_fmt_range([r['grad_cos'] for r in records])}; projection on "
            f"{sum(bool(r['projection']) for r in records)}/{len(records)} steps",
        ]
        if cfg.craft.keep_weights_gathered:  # what one GPU cannot show: the sharded run's extra memory
            gathered = total_params * (2 if cfg.vla.enable_mixed_precision_training else 4)
            lines.append(f"gathered : --craft.keep_weights_gathered: under FSDP each GPU holds all the gathered weights "
                         f"from the action backward to the end of the anchor pass, up to {gathered / 2**30:.2f} GiB "
                         f"({total_params:,} parameters in {cfg.vla.compute_dtype}) beyond FSDP's own peak"
                         + ("; no effect on one process" if plan.world_size == 1 else ""))
    lines += [
        f"L_act    : {_fmt_range([r['L_act'] for r in records])}",
        f"steps    : {len(records)} run, {skipped} skipped for non-finite values",
        f"speed    : {median:.3f} s/step (median), {global_batch / median:.1f} samples/s; "
        f"--vla.max_steps {cfg.vla.max_steps} would take ~{median * cfg.vla.max_steps / 3600:.1f} h on this setup",
    ]
    if device.type == "cuda":
        lines.append(f"memory   : peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated")
    for note in plan.notes:
        lines.append(f"note     : {note}")
    lines.append("verdict  : " + ("OK — launch the full run with the same flags and without --dry_run_batches"
                                  if not skipped else "some steps were non-finite — check the learning rate and data"))
    return "\n".join(lines)


def _signal(meta: dict) -> str:
    """What the cache's targets are, in the builder's flags."""
    if meta.get("retention_mode", "hidden") == "action":
        return f"retention_mode action ({meta.get('n_action_bins', 256)} action bins)"
    layers = meta.get("hidden_layers") or [meta["hidden_layer"]]
    return f"hidden_layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}, pooling {meta['pooling']}"
