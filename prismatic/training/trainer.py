"""The training loop: composes the OpenVLA model and data with CRaFT's step.

Order of work: pre-flight checks (cheap, may fail; before any process group, model or data) ->
process group, model (sharded with several processes), data, optimizer -> optional resume ->
steps -> logs and checkpoints. `--craft.enabled false` runs exactly the baseline step.
"""

import json
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import draccus
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from craft.dual import EpsilonSchedule, RetentionConstraint
from craft.step import StepResult
from prismatic.conf.train import TrainConfig, config_dict
from prismatic.models import ImageProcessor, OpenVLA, load_pretrained
from prismatic.models.checkpoint import read_config, read_tokenizer, read_weights, rebuild_rotary
from prismatic.training.batches import ActionBatches, AnchorBatches, AnchorInputs, stack_rows, to_device
from prismatic.models.quantize import quantize_base
from prismatic.training.evaluation import Evaluator, build_evaluator
from prismatic.training.checkpointing import load_adapters, load_training_state, save_checkpoint, save_due
from prismatic.training.distributed import init_process_group, shard_model
from prismatic.training.l2_sp import L2SP
from prismatic.training.metrics import EVAL_CONSOLE_KEYS, ConsoleSink, JsonlSink, Metrics, WandbSink
from prismatic.training.objective import Objective
from prismatic.training.optim import build_optimizer, build_scheduler, parameter_counts
from prismatic.training.prefetch import prefetch
from prismatic.training.preflight import Plan, preflight
from prismatic.training.report import dry_run_report
from prismatic.training.stages import apply_train_stage, make_trainable
from prismatic.models.batching import PaddedCollator
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


@dataclass
class Job:
    """The running job: what a step, a checkpoint or an evaluation (at the start, every --eval.interval steps,
    at each checkpoint and at the end) needs."""

    cfg: TrainConfig
    plan: Plan
    model: torch.nn.Module
    tokenizer: object
    processor: ImageProcessor
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    constraint: Optional[RetentionConstraint]  # None: the baseline (--craft.enabled false)
    actions: ActionBatches
    anchors: Optional[AnchorBatches]
    replay: Optional[AnchorBatches]  # anchor frames joined to every action micro-batch (--vla.replay_batch_size)
    evaluator: Optional[Evaluator]  # None: no evaluation in this run (a dry run, unless asked)
    epsilon_schedule: EpsilonSchedule  # the budget evaluations count drift against, CRaFT or not
    dataset_statistics: dict
    frames_per_step: int  # per rank
    start: int  # steps already done (resumed)

    def retention_step(self, step: int) -> bool:
        """Whether `step` (counted from 0) is a CRaFT step: every --craft.retention_interval-th; else the
        baseline step."""
        return self.constraint is not None and step % self.cfg.craft.retention_interval == 0

    def evaluate(self, step: int, metrics: Metrics) -> None:
        """Every rank evaluates its share; plain fine-tuning is counted against the same budget as CRaFT."""
        metrics.log_eval(self.evaluator(step, self.epsilon_schedule(step)))

    def save_due(self, steps_done: int, end: int) -> bool:
        """Whether a checkpoint is written after `steps_done` steps (never in a dry run)."""
        return not self.cfg.dry_run_batches and save_due(steps_done, end, self.cfg.save_interval)

    def evaluation_due(self, steps_done: int, end: int) -> bool:
        """Every --eval.interval steps, at each checkpoint and at the end."""
        interval = self.cfg.eval.interval
        return self.evaluator is not None and (
            (interval > 0 and steps_done % interval == 0) or self.save_due(steps_done, end) or steps_done == end)


def _train(cfg: TrainConfig, plan: Plan) -> List[dict]:
    if plan.env.is_main:
        for note in plan.notes:
            print(f"note: {note}", flush=True)
    seed_everything(cfg.seed)
    dry_run = cfg.dry_run_batches > 0
    job = _build_job(cfg, plan, evaluate=not dry_run or cfg.eval.during_dry_run)
    end = cfg.dry_run_batches if dry_run else cfg.vla.max_steps
    metrics = _open_sinks(cfg, plan, job.dataset_statistics, job.start) if plan.env.is_main and not dry_run else \
        Metrics([ConsoleSink()], [ConsoleSink(EVAL_CONSOLE_KEYS, prefix="eval ")]) if plan.env.is_main else Metrics([])
    records = []
    inputs = prefetch(_step_inputs(job, end))
    try:
        if job.evaluator is not None and cfg.eval.at_start and job.start == 0:
            job.evaluate(0, metrics)
        for step in range(job.start, end):
            record = _train_step(job, step, next(inputs))
            if step == job.start and plan.resume_changes:  # where a dashboard marks the change
                record["changes"] = "; ".join(f"{c['flag']} {c['old']} -> {c['new']}" for c in plan.resume_changes)
            metrics.log(record)
            records.append(record)
            if job.evaluation_due(step + 1, end):
                job.evaluate(step + 1, metrics)
            if job.save_due(step + 1, end):
                _save(job, step + 1)
    finally:
        inputs.close()
        metrics.close()
    if dry_run and plan.env.is_main:
        total, trainable = parameter_counts(job.model)
        print(dry_run_report(cfg, plan, records, total, trainable, plan.device), flush=True)
    return records


def _build_job(cfg: TrainConfig, plan: Plan, evaluate: bool) -> Job:
    """Model, objective, optimizer, then the saved state when resuming, then the data from where it stopped,
    and the evaluator."""
    env, device = plan.env, plan.device
    model, tokenizer, model_config = _build_model(cfg, plan)
    # FSDP2 computes in bf16 itself; one process uses autocast for the same effect.
    mixed = cfg.vla.enable_mixed_precision_training and not env.distributed
    l2_sp = L2SP.from_checkpoint(model, cfg.pretrained_checkpoint, cfg.vla.l2_sp_weight) \
        if cfg.vla.l2_sp_weight > 0 else None
    objective = Objective.build(model, cfg.craft, env=env, device=device, sharding_strategy=cfg.sharding_strategy,
                                autocast_dtype=torch.bfloat16 if mixed else None,
                                gradient_checkpointing=cfg.vla.enable_gradient_checkpointing,
                                max_grad_norm=cfg.vla.max_grad_norm, regularize=l2_sp)
    optimizer = build_optimizer(model, cfg.vla.learning_rate, cfg.vla.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.vla.lr_scheduler_type, cfg.vla.max_steps, cfg.vla.warmup_ratio)
    constraint = RetentionConstraint.from_config(cfg.craft, cfg.vla.max_steps) if cfg.craft.enabled else None
    start, frames_done = 0, 0
    if plan.resume_path is not None:
        state = load_training_state(plan.resume_path, model=model, optimizer=optimizer, scheduler=scheduler, env=env,
                                    learning_rate=cfg.vla.learning_rate)
        start, frames_done = state["step"], state["frames_per_rank"]
        if constraint is not None:
            constraint.load_state_dict(state["craft"])
    stream = RLDSStream(cfg.data_root_dir, cfg.vla.data_mix, train=True, shuffle_buffer_size=cfg.vla.shuffle_buffer_size,
                        image_aug=cfg.image_aug, seed=cfg.seed, rank=env.rank, world_size=env.world_size,
                        skip_frames=frames_done)
    processor = ImageProcessor.from_pretrained(_weights_source(cfg, plan), model_config)
    actions = ActionBatches(stream, tokenizer, processor, cfg.vla.per_device_batch_size,
                            PaddedCollator(tokenizer.pad_token_id, model_config.llm_max_length),
                            objective.action_tokenizer)
    inputs = AnchorInputs(processor, objective.action_tokenizer, tokenizer.eos_token_id, model_config.pad_token_id)
    anchors = AnchorBatches(plan.cache, partial(inputs.for_signal, signal=objective.signal), cfg.craft.anchor_batch_size,
                            cfg.craft.anchor_seed, env.rank, env.world_size) if constraint is not None else None
    # Replay draws its own stream of anchors, so that with CRaFT on the two do not see the same rows each step.
    replay = AnchorBatches(plan.cache, inputs.replay, cfg.vla.replay_batch_size, cfg.craft.anchor_seed + 1, env.rank,
                           env.world_size) if cfg.vla.replay_batch_size else None
    evaluator = build_evaluator(
        cfg.eval, model, cache=plan.cache, loss_type=cfg.craft.loss_type, processor=processor,
        tokenizer=tokenizer, action_tokenizer=objective.action_tokenizer, max_length=model_config.llm_max_length,
        data_root_dir=cfg.data_root_dir, data_mix=cfg.vla.data_mix, batch_size=cfg.vla.per_device_batch_size,
        device=device, autocast=objective.autocast, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
    ) if evaluate else None
    if evaluator is not None and env.is_main:
        for note in evaluator.notes:
            print(f"note: {note}", flush=True)
    epsilon_schedule = RetentionConstraint.from_config(cfg.craft, cfg.vla.max_steps).schedule
    return Job(cfg, plan, model, tokenizer, processor, objective, optimizer, scheduler, constraint, actions, anchors,
               replay, evaluator, epsilon_schedule, stream.statistics,
               frames_per_step=cfg.vla.per_device_batch_size * plan.grad_accumulation_steps, start=start)


def _step_inputs(job: Job, end: int):
    """CPU inputs of each step: action micro-batches (with replayed anchor frames joined), and this rank's anchor
    draws (k of `accum`)."""
    accum, pad = job.plan.grad_accumulation_steps, job.plan.model_config.pad_token_id
    for step in range(job.start, end):
        actions = [next(job.actions) for _ in range(accum)]
        if job.replay is not None:
            actions = [stack_rows(a, job.replay.draw(step * accum + k), pad) for k, a in enumerate(actions)]
        yield actions, [job.anchors.draw(step * accum + k) for k in range(accum)] if job.retention_step(step) else []


def _train_step(job: Job, step: int, inputs) -> dict:
    """One optimizer step on this rank's inputs; returns its metrics row (step counts from 1)."""
    t0 = time.perf_counter()
    device = job.plan.device
    acts, anchors = ([to_device(b, device) for b in batches] for batches in inputs)
    t_data = time.perf_counter() - t0
    constraint = job.constraint if job.retention_step(step) else None
    result, action_metrics = job.objective.step(job.optimizer, constraint, acts, anchors,
                                                next_step=step + job.cfg.craft.retention_interval)
    lr = job.scheduler.get_last_lr()[0]
    if not result.skipped:
        job.scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_time = time.perf_counter() - t0
    return _record(step + 1, job.cfg, result, job.constraint, lr, action_metrics, step_time, t_data,
                   job.frames_per_step * job.plan.env.world_size)


def _save(job: Job, step: int) -> None:
    cfg, plan = job.cfg, job.plan
    trainer_state = {"step": step, "craft": job.constraint.state_dict() if job.constraint else None,
                     "frames_per_rank": step * job.frames_per_step, "run_id": plan.run_id}
    save_checkpoint(plan.run_dir, step, model=job.model, tokenizer=job.tokenizer,
                    dataset_statistics=job.dataset_statistics, optimizer=job.optimizer, scheduler=job.scheduler,
                    trainer_state=trainer_state, train_config=config_dict(cfg), env=plan.env,
                    keep_last=cfg.keep_last_checkpoints, merge_lora=cfg.vla.merge_on_save,
                    lora_scaling=cfg.vla.lora_scaling if cfg.vla.use_lora else None,
                    source_dir=cfg.pretrained_checkpoint)


def _build_model(cfg: TrainConfig, plan: Plan):
    """The weights to start from (the checkpoint being resumed, or the pretrained one plus adapters), in
    train mode, sharded with several processes."""
    vla, env = cfg.vla, plan.env
    source = _weights_source(cfg, plan)
    if env.distributed and not vla.use_lora:
        return _sharded_from_rank0(source, cfg, plan)
    # A frozen LoRA base needs no fp32 master copy; FSDP keeps it fp32 and casts for compute itself.
    base_dtype = torch.bfloat16 if vla.use_lora and vla.enable_mixed_precision_training and not env.distributed \
        else torch.float32
    model, tokenizer, config = load_pretrained(source, dtype=base_dtype, device=plan.device)
    if vla.base_quantization != "none":
        quantize_base(model, vla.base_quantization, getattr(torch, vla.compute_dtype))
    model = make_trainable(model, vla)
    if vla.use_lora and plan.resume_path is not None:
        load_adapters(model, plan.resume_path)
    _prepare_for_training(model, cfg, plan)
    return model, tokenizer, config


def _weights_source(cfg: TrainConfig, plan: Plan):
    """The checkpoint being resumed, or (also under LoRA, whose checkpoints hold adapters) the pretrained one."""
    return plan.resume_path if plan.resume_path is not None and not cfg.vla.use_lora else cfg.pretrained_checkpoint


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


def _record(step: int, cfg: TrainConfig, result: StepResult, constraint: Optional[RetentionConstraint], lr: float,
            action_metrics: dict, step_time: float, data_time: float, samples: int) -> dict:
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
    record.update(action_metrics)
    return record


def _open_sinks(cfg: TrainConfig, plan: Plan, dataset_statistics: dict, start: int) -> Metrics:
    """Rank 0's sinks: step rows to metrics.jsonl, evaluation rows to eval.jsonl, both to the console and W&B.
    On resume, rows past the checkpoint are moved aside, not lost, and the flags changed since it are appended to
    changes.jsonl (`step`: the first step run with the new values)."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "config.yaml").write_text(draccus.dump(cfg))
    (plan.run_dir / "dataset_statistics.json").write_text(json.dumps(dataset_statistics, indent=2))
    logs = {kind: plan.run_dir / f"{kind}.jsonl" for kind in ("metrics", "eval", "changes")}
    if start:
        for log in logs.values():
            _set_aside_rows_after(log, start)
    if plan.resume_changes:
        with open(logs["changes"], "a", encoding="utf-8") as changes:
            changes.writelines(json.dumps({"step": start + 1, **change, "checkpoint": str(plan.resume_path)}) + "\n"
                               for change in plan.resume_changes)
    sinks, eval_sinks = [ConsoleSink()], [ConsoleSink(EVAL_CONSOLE_KEYS, prefix="eval ")]
    if "jsonl" in cfg.trackers:
        sinks.append(JsonlSink(logs["metrics"]))
        eval_sinks.append(JsonlSink(logs["eval"]))
    if "wandb" in cfg.trackers:
        wandb = WandbSink(plan.run_dir, plan.run_id, cfg.wandb_project, cfg.wandb_entity, cfg.wandb_mode,
                          config=config_dict(cfg))
        sinks.append(wandb)
        eval_sinks.append(wandb)
    return Metrics(sinks, eval_sinks)


def _set_aside_rows_after(log, step: int) -> None:
    """Rows of `log` past `step` go to `<name>.superseded-<time>.jsonl` beside it."""
    if not log.exists():
        return
    lines = log.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        with open(log.with_name(f"{log.stem}.superseded-{stamp}.jsonl"), "a", encoding="utf-8") as aside:
            aside.write("".join(line + "\n" for line in lines if json.loads(line)["step"] > step))
        log.write_text("".join(line + "\n" for line in kept))
