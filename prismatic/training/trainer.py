"""The training loop: composes the OpenVLA model and data with CRaFT's step.

Order of work: pre-flight checks (cheap, may fail) -> model, data, cache -> steps -> logs and
checkpoints. `--craft.enabled false` runs exactly the baseline step on the same batches.
"""

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import draccus
import numpy as np
import torch

from craft.anchor_cache import AnchorCache, anchor_indices
from craft.dual import RetentionConstraint
from craft.retention import pool_hidden, retention_loss
from craft.step import StepResult, baseline_step, craft_step
from prismatic.conf.train import TrainConfig
from prismatic.models import ImageProcessor, load_pretrained, save_pretrained
from prismatic.training.batches import ActionBatches, anchor_inputs, to_device
from prismatic.training.metrics import ConsoleSink, JsonlSink, Metrics, WandbSink, action_metrics
from prismatic.training.optim import build_optimizer, build_scheduler, parameter_counts
from prismatic.training.preflight import Plan, preflight
from prismatic.training.report import dry_run_report
from prismatic.training.stages import apply_train_stage
from prismatic.vla.action_tokenizer import ActionTokenizer
from prismatic.vla.batching import PaddedCollator
from prismatic.vla.datasets import RLDSStream


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> List[dict]:
    """Runs the job; returns the per-step records (all of them for a dry run)."""
    plan = preflight(cfg)
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    seed_everything(cfg.seed)
    device = plan.device

    model, tokenizer, model_config = load_pretrained(cfg.pretrained_checkpoint, dtype=torch.float32, device=device)
    params = apply_train_stage(model, cfg.vla.train_stage)
    if cfg.vla.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.vla.enable_mixed_precision_training
                else nullcontext())

    stream = RLDSStream(cfg.data_root_dir, cfg.vla.data_mix, train=True, shuffle_buffer_size=cfg.vla.shuffle_buffer_size,
                        image_aug=cfg.image_aug, seed=cfg.seed)
    processor = ImageProcessor(model_config)
    action_tokenizer = ActionTokenizer(n_bins=model_config.n_action_bins)
    batches = ActionBatches(stream, tokenizer, processor, cfg.vla.per_device_batch_size,
                            PaddedCollator(tokenizer.pad_token_id, model_config.llm_max_length), action_tokenizer)
    optimizer = build_optimizer(model, cfg.vla.learning_rate, cfg.vla.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.vla.lr_scheduler_type, cfg.vla.max_steps, cfg.vla.warmup_ratio)

    cache = AnchorCache.open(cfg.craft.anchor_cache_dir) if cfg.craft.enabled else None
    constraint = RetentionConstraint.from_config(cfg.craft, cfg.vla.max_steps) if cfg.craft.enabled else None

    def action_loss_fn(batch, micro_metrics: list):
        def fn():
            with autocast:
                out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            micro_metrics.append(action_metrics(out.action_logits.detach(), out.action_targets,
                                                                  action_tokenizer))
            return out.loss
        return fn

    def retention_loss_fn(batch):
        def fn():
            with autocast:
                hidden = model.hidden_states(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                             layer=cfg.craft.hidden_layer)
            features = pool_hidden(hidden, cfg.craft.pooling, model.image_token_slice, batch["attention_mask"])
            return retention_loss(features, batch["target_features"], cfg.craft.retention_loss_type)
        return fn

    dry_run = cfg.dry_run_batches > 0
    n_steps = cfg.dry_run_batches if dry_run else cfg.vla.max_steps
    metrics = _open_sinks(cfg, plan, stream.statistics) if not dry_run else Metrics([ConsoleSink()])
    accum = plan.grad_accumulation_steps
    records = []
    try:
        for step in range(n_steps):
            t0 = time.perf_counter()
            act_batches = [to_device(next(batches), device) for _ in range(accum)]
            micro_metrics: list = []
            act_fns = [action_loss_fn(b, micro_metrics) for b in act_batches]
            if cache is not None:
                ret_batches = [to_device(_anchor_batch(cache, step * accum + k, cfg, processor), device)
                               for k in range(accum)]
                t_data = time.perf_counter() - t0
                result = craft_step(params, optimizer, constraint, act_fns, [retention_loss_fn(b) for b in ret_batches],
                                    cfg.vla.max_grad_norm)
            else:
                t_data = time.perf_counter() - t0
                result = baseline_step(params, optimizer, act_fns, cfg.vla.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            if not result.skipped:
                scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - t0
            record = _record(step + 1, cfg, result, constraint, lr, micro_metrics, step_time, t_data,
                             cfg.vla.per_device_batch_size * accum * plan.world_size)
            metrics.log(record)
            records.append(record)
            if not dry_run and ((step + 1) % cfg.save_interval == 0 or step + 1 == n_steps):
                _save(plan.run_dir, step + 1, model, tokenizer, stream.statistics, constraint)
    finally:
        metrics.close()
    if dry_run:
        total, trainable = parameter_counts(model)
        print(dry_run_report(cfg, plan, records, total, trainable, device), flush=True)
    return records


def _anchor_batch(cache: AnchorCache, draw: int, cfg: TrainConfig, processor) -> dict:
    rows = cache.batch(anchor_indices(draw, cfg.craft.anchor_batch_size, cache.num_anchors, cfg.craft.anchor_seed))
    return {**anchor_inputs(rows, processor), "target_features": torch.from_numpy(rows["target_features"])}


def _record(step: int, cfg: TrainConfig, result: StepResult, constraint: Optional[RetentionConstraint], lr: float,
            micro_metrics: List[dict], step_time: float, data_time: float, samples: int) -> dict:
    """The eight CRaFT fields under the user's names, then what else a user expects to watch."""
    craft = cfg.craft.enabled
    record = {
        "step": step,
        "retention_mode": cfg.craft.retention_mode if craft else "disabled",
        "L_act": result.L_act,
        "L_ret": result.L_ret,
        "lambda": constraint.lam if craft else None,  # after this step's dual update
        "epsilon": result.epsilon,
        "grad_dot": result.grad_dot,
        "grad_cos": result.grad_cos,
        "projection": result.projection,
        "learning_rate": lr,
        "grad_norm": result.grad_norm,
        "skipped": result.skipped,
        "step_time_s": step_time,
        "data_time_s": data_time,
        "samples_per_s": samples / step_time,
    }
    for key in ("action_accuracy", "l1_loss"):
        values = [m[key] for m in micro_metrics]
        record[key] = float(np.mean(values)) if values else None
    return record


def _open_sinks(cfg: TrainConfig, plan: Plan, dataset_statistics: dict) -> Metrics:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "config.yaml").write_text(draccus.dump(cfg))
    (plan.run_dir / "dataset_statistics.json").write_text(json.dumps(dataset_statistics, indent=2))
    sinks = [ConsoleSink()]
    if "jsonl" in cfg.trackers:
        sinks.append(JsonlSink(plan.run_dir / "metrics.jsonl"))
    if "wandb" in cfg.trackers:
        sinks.append(WandbSink(plan.run_dir, plan.run_id, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode,
                               config=json.loads(json.dumps(asdict(cfg), default=str))))
    return Metrics(sinks)


def _save(run_dir: Path, step: int, model, tokenizer, dataset_statistics: dict,
          constraint: Optional[RetentionConstraint]) -> Path:
    """`checkpoints/step-NNNNNN/`: the model in the OpenVLA layout plus the CRaFT dual state."""
    out = run_dir / "checkpoints" / f"step-{step:06d}"
    save_pretrained(model, out, tokenizer=tokenizer, dataset_statistics=dataset_statistics)
    state = {"step": step, "craft": constraint.state_dict() if constraint else None}
    (out / "trainer_state.json").write_text(json.dumps(state, indent=2))
    return out
