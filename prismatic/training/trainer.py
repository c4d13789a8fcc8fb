"""The training loop: composes the OpenVLA model and data with CRaFT's step.

Order of work: pre-flight checks (cheap, may fail; before any process group, model or data) ->
process group, model (sharded with several processes), data, optimizer -> optional resume ->
steps -> logs and checkpoints. `--craft.enabled false` runs exactly the baseline step.
"""

import json
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import List, Optional

import draccus
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from craft.anchor_cache import AnchorCache, anchor_indices
from craft.dual import RetentionConstraint
from craft.retention import anchor_features, pool_hidden, retention_loss
from craft.one_pass import RowGroupSplit
from craft.step import Collective, StepResult, baseline_step, craft_step, craft_step_one_pass
from prismatic.conf.train import TrainConfig
from prismatic.models import ImageProcessor, OpenVLA, load_pretrained
from prismatic.models.checkpoint import read_config, read_tokenizer, read_weights, rebuild_rotary
from prismatic.training.batches import ActionBatches, anchor_inputs, joint_batch, to_device
from prismatic.models.lora import add_lora, lora_targets
from prismatic.models.quantize import quantize_base
from prismatic.training.checkpointing import load_adapters, load_training_state, save_checkpoint
from prismatic.training.distributed import FSDPCollective, init_process_group, shard_model
from prismatic.training.metrics import ConsoleSink, JsonlSink, Metrics, WandbSink, action_metrics
from prismatic.training.optim import build_optimizer, build_scheduler, parameter_counts
from prismatic.training.prefetch import prefetch
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
    """Runs the job; returns this rank's per-step records."""
    plan = preflight(cfg)
    env, device = plan.env, plan.device
    init_process_group(env, device, cfg.dist_timeout_s)
    try:
        return _train(cfg, plan)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, plan: Plan) -> List[dict]:
    env, device = plan.env, plan.device
    if env.is_main:
        for note in plan.notes:
            print(f"note: {note}", flush=True)
    seed_everything(cfg.seed)

    mixed = cfg.vla.enable_mixed_precision_training
    model, tokenizer, model_config = _build_model(cfg, plan)
    one_pass = cfg.craft.enabled and cfg.craft.step_impl == "one_pass"
    split = RowGroupSplit(action_only=[model.language_model.lm_head]) if one_pass else None
    if one_pass and cfg.vla.enable_gradient_checkpointing:  # the recomputed forward must be split too
        model.gradient_checkpointing_enable(context_fn=split.recompute_context)
    collective = FSDPCollective(model, env, device, cfg.sharding_strategy, split) if env.distributed \
        else Collective()
    # FSDP2 computes in bf16 itself; one process uses autocast for the same effect.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mixed and not env.distributed else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    stash_dtype = getattr(torch, cfg.craft.grad_stash_dtype) if cfg.craft.grad_stash_dtype else None
    optimizer = build_optimizer(model, cfg.vla.learning_rate, cfg.vla.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.vla.lr_scheduler_type, cfg.vla.max_steps, cfg.vla.warmup_ratio)
    constraint = RetentionConstraint.from_config(cfg.craft, cfg.vla.max_steps) if cfg.craft.enabled else None

    start = 0
    if plan.resume_path is not None:
        state = load_training_state(plan.resume_path, model=model, optimizer=optimizer, scheduler=scheduler, env=env)
        start = state["step"]
        if constraint is not None:
            constraint.load_state_dict(state["craft"])
    accum = plan.grad_accumulation_steps
    frames_per_step = cfg.vla.per_device_batch_size * accum
    stream = RLDSStream(cfg.data_root_dir, cfg.vla.data_mix, train=True, shuffle_buffer_size=cfg.vla.shuffle_buffer_size,
                        image_aug=cfg.image_aug, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                        skip_frames=start * frames_per_step)
    processor = ImageProcessor(model_config)
    action_tokenizer = ActionTokenizer(n_bins=model_config.n_action_bins)
    batches = ActionBatches(stream, tokenizer, processor, cfg.vla.per_device_batch_size,
                            PaddedCollator(tokenizer.pad_token_id, model_config.llm_max_length), action_tokenizer)

    def action_loss_fn(batch, micro_metrics: list):
        def fn():
            with autocast:
                out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            micro_metrics.append(action_metrics(out.action_logits.detach(), out.action_targets, action_tokenizer))
            return out.loss
        return fn

    def retention_from_hidden(hidden, batch):
        features = pool_hidden(hidden, cfg.craft.pooling, model.image_token_slice, batch["attention_mask"])
        return retention_loss(features, batch["target_features"], cfg.craft.retention_loss_type)

    pause = model.activation_checkpointing_paused if not cfg.craft.anchor_checkpointing else nullcontext

    def retention_loss_fn(batch):
        def fn():
            with autocast, pause():
                features = anchor_features(model, batch, cfg.craft.hidden_layer, cfg.craft.pooling)
            return retention_loss(features, batch["target_features"], cfg.craft.retention_loss_type)
        return fn

    def joint_loss_fn(batch, micro_metrics: list):
        """One forward over [action; anchor] rows: L_act on the first rows, L_ret from the others."""
        n = batch["n_action_rows"]

        def fn():
            with autocast:
                out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                            output_hidden_states=True)
            micro_metrics.append(action_metrics(out.action_logits.detach(), out.action_targets, action_tokenizer))
            anchors = {"attention_mask": batch["attention_mask"][n:], "target_features": batch["target_features"]}
            return out.loss, retention_from_hidden(out.hidden_states[cfg.craft.hidden_layer][n:], anchors)
        return fn, n, batch["input_ids"].shape[0]

    dry_run = cfg.dry_run_batches > 0
    end = cfg.dry_run_batches if dry_run else cfg.vla.max_steps

    def step_inputs():
        """CPU inputs of each step: action micro-batches, and this rank's anchor draws (k of `accum`)."""
        for step in range(start, end):
            acts = [next(batches) for _ in range(accum)]
            anchors = [_anchor_batch(plan.cache, step * accum + k, cfg, processor, env) for k in range(accum)] \
                if constraint is not None else []
            yield acts, anchors

    metrics = _open_sinks(cfg, plan, stream.statistics, start) if env.is_main and not dry_run else \
        Metrics([ConsoleSink()] if env.is_main else [])
    records = []
    inputs = prefetch(step_inputs())
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            acts, anchors = next(inputs)
            act_batches = [to_device(b, device) for b in acts]
            ret_batches = [to_device(b, device) for b in anchors]
            t_data = time.perf_counter() - t0
            micro_metrics: list = []
            act_fns = [action_loss_fn(b, micro_metrics) for b in act_batches]
            if one_pass:
                joint = [joint_loss_fn(joint_batch(a, r, tokenizer.pad_token_id), micro_metrics)
                         for a, r in zip(act_batches, ret_batches)]
                result = craft_step_one_pass(params, optimizer, constraint, joint, split, cfg.vla.max_grad_norm,
                                             collective, stash_dtype)
            elif constraint is not None:
                result = craft_step(params, optimizer, constraint, act_fns, [retention_loss_fn(b) for b in ret_batches],
                                    cfg.vla.max_grad_norm, collective, stash_dtype)
            else:
                result = baseline_step(params, optimizer, act_fns, cfg.vla.max_grad_norm, collective)
            lr = scheduler.get_last_lr()[0]
            if not result.skipped:
                scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - t0
            record = _record(step + 1, cfg, result, constraint, lr, micro_metrics, step_time, t_data,
                             frames_per_step * env.world_size)
            metrics.log(record)
            records.append(record)
            if not dry_run and ((step + 1) % cfg.save_interval == 0 or step + 1 == end):
                trainer_state = {"step": step + 1, "craft": constraint.state_dict() if constraint else None,
                                 "frames_per_rank": (step + 1) * frames_per_step, "run_id": plan.run_id}
                save_checkpoint(plan.run_dir, step + 1, model=model, tokenizer=tokenizer,
                                dataset_statistics=stream.statistics, optimizer=optimizer, scheduler=scheduler,
                                trainer_state=trainer_state, env=env, keep_last=cfg.keep_last_checkpoints,
                                lora_scaling=cfg.vla.lora_scaling if cfg.vla.use_lora else None,
                                merge_lora=cfg.vla.merge_on_save, source_dir=cfg.pretrained_checkpoint)
    finally:
        inputs.close()
        metrics.close()
    if dry_run and env.is_main:
        total, trainable = parameter_counts(model)
        print(dry_run_report(cfg, plan, records, total, trainable, device), flush=True)
    return records


def _build_model(cfg: TrainConfig, plan: Plan):
    """The weights to start from (the checkpoint being resumed, or the pretrained one plus adapters), in
    train mode, sharded with several processes."""
    vla, env = cfg.vla, plan.env
    source = plan.resume_path if plan.resume_path is not None and not vla.use_lora else cfg.pretrained_checkpoint
    if env.distributed and not vla.use_lora:
        return _sharded_from_rank0(source, cfg, plan)
    # A frozen LoRA base needs no fp32 master copy; FSDP keeps it fp32 and casts for compute itself.
    base_dtype = torch.bfloat16 if vla.use_lora and vla.enable_mixed_precision_training and not env.distributed \
        else torch.float32
    model, tokenizer, config = load_pretrained(source, dtype=base_dtype, device=plan.device)
    if vla.base_quantization != "none":
        quantize_base(model, vla.base_quantization, getattr(torch, vla.compute_dtype))
    if vla.use_lora:
        model = add_lora(model, vla.lora_rank, vla.resolved_lora_alpha, vla.lora_dropout,
                         lora_targets(model, vla.lora_target_modules))
        if plan.resume_path is not None:
            load_adapters(model, plan.resume_path)
    else:
        apply_train_stage(model, vla.train_stage)
    _prepare_for_training(model, cfg, plan)
    return model, tokenizer, config


def _prepare_for_training(model, cfg: TrainConfig, plan: Plan) -> None:
    if cfg.vla.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if plan.env.distributed:
        shard_model(model, plan.env, plan.device, cfg.sharding_strategy, cfg.vla.enable_mixed_precision_training)


def _sharded_from_rank0(source, cfg: TrainConfig, plan: Plan):
    """Build on the meta device, shard, then let rank 0 read the checkpoint and broadcast it shard by shard:
    host memory holds one model copy per node's rank 0, not one per process."""
    config = read_config(source)
    with torch.device("meta"):
        model = OpenVLA.from_config(config)
    apply_train_stage(model, cfg.vla.train_stage)
    _prepare_for_training(model, cfg, plan)
    model.to_empty(device=plan.device)
    weights = dict(read_weights(source, set(model.state_dict()))) if plan.env.is_main else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del weights
    rebuild_rotary(model, plan.device)
    return model, read_tokenizer(source), config


def _anchor_batch(cache: AnchorCache, draw: int, cfg: TrainConfig, processor, env) -> dict:
    indices = anchor_indices(draw, cfg.craft.anchor_batch_size, cache.num_anchors, cfg.craft.anchor_seed,
                             rank=env.rank, world_size=env.world_size)
    rows = cache.batch(indices)
    return {**anchor_inputs(rows, processor), "target_features": torch.from_numpy(rows["target_features"])}


def _record(step: int, cfg: TrainConfig, result: StepResult, constraint: Optional[RetentionConstraint], lr: float,
            micro_metrics: List[dict], step_time: float, data_time: float, samples: int) -> dict:
    """The eight CRaFT fields under the user's names, then what else a user expects to watch."""
    craft = constraint is not None
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
    for key in ("action_accuracy", "l1_loss"):  # this rank's micro-batches (rank 0 logs)
        values = [m[key] for m in micro_metrics]
        record[key] = float(np.mean(values)) if values else None
    return record


def _open_sinks(cfg: TrainConfig, plan: Plan, dataset_statistics: dict, start: int) -> Metrics:
    """Rank 0's sinks. On resume, log rows past the checkpoint are moved aside, not lost."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "config.yaml").write_text(draccus.dump(cfg))
    (plan.run_dir / "dataset_statistics.json").write_text(json.dumps(dataset_statistics, indent=2))
    log = plan.run_dir / "metrics.jsonl"
    if start and log.exists():
        lines = log.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= start]
        if len(kept) < len(lines):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (plan.run_dir / f"metrics.superseded-{stamp}.jsonl").write_text(
                "\n".join(line for line in lines if json.loads(line)["step"] > start) + "\n")
            log.write_text("".join(line + "\n" for line in kept))
    sinks = [ConsoleSink()]
    if "jsonl" in cfg.trackers:
        sinks.append(JsonlSink(log))
    if "wandb" in cfg.trackers:
        sinks.append(WandbSink(plan.run_dir, plan.run_id, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode,
                               config=json.loads(json.dumps(asdict(cfg), default=str))))
    return Metrics(sinks)
