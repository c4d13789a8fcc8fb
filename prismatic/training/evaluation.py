"""Retention instruments: representation drift on held-out and training anchors, action metrics on validation data.

Training logs `L_ret` only on the anchors it optimises, which the optimiser can fit while the representation
drifts elsewhere; these numbers are measured on inputs training never draws from (and work for plain
fine-tuning too). Every process evaluates its share and the sums are reduced once, so the result does not
depend on the number of processes; every process runs the same number of forwards (FSDP gathers weights
collectively), padding its share with forwards whose results are not counted.
"""

import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from craft.anchor_cache import AnchorCache
from craft.retention import cache_signal
from prismatic.conf.eval import EvalConfig
from prismatic.models.batching import PaddedCollator
from prismatic.models.quantize import keep_quantized_in_train_mode
from prismatic.training.batches import ActionBatches, AnchorInputs, to_device
from prismatic.training.metrics import action_metrics

DRIFT_SUMS = ("L_ret", "over_eps", "cos", "count")
ACTION_SUMS = ("ce", "supervised", "accuracy", "l1", "action_tokens")


@dataclass
class AnchorSet:
    """Anchors of `cache` (rows `indices`) whose drift is reported as eval/<name>_*, measured by the cache's own
    retention signal (mode, layers, pooling), whatever the run's CRaFT settings (plain fine-tuning included)."""

    name: str
    cache: AnchorCache
    indices: np.ndarray


class FrameSet:
    """The first `num_frames` frames of a seeded stream, read once and reused by every evaluation, so that
    successive evaluations compare the model on the same data."""

    def __init__(self, name: str, stream: Callable[[], Iterable[dict]], num_frames: int):
        self.name, self.stream, self.num_frames = name, stream, num_frames
        self._frames: Optional[List[dict]] = None

    @property
    def frames(self) -> List[dict]:
        if self._frames is None:
            self._frames = list(itertools.islice(iter(self.stream()), self.num_frames))
        return self._frames


class Evaluator:
    """Called as `evaluator(step, epsilon)` on every process; returns the same eval row on all of them:
    {"step", "epsilon", "eval/...": float, ..., "eval_time_s"}. A metric that cannot be computed is absent."""

    def __init__(self, model, *, anchor_sets: List[AnchorSet], frame_sets: List[FrameSet], loss_type: str,
                 processor, tokenizer, action_tokenizer, collator: PaddedCollator, batch_size: int,
                 device: torch.device, autocast: Callable = nullcontext, rank: int = 0, world_size: int = 1,
                 notes: Iterable[str] = ()):
        self.model, self.anchor_sets, self.frame_sets, self.loss_type = model, anchor_sets, frame_sets, loss_type
        self.processor, self.tokenizer, self.action_tokenizer = processor, tokenizer, action_tokenizer
        self.collator, self.batch_size, self.device, self.autocast = collator, batch_size, device, autocast
        self.rank, self.world_size = rank, world_size
        self.notes = list(notes)
        self.anchor_inputs = AnchorInputs(processor, action_tokenizer, tokenizer.eos_token_id, collator.pad_token_id)
        self._batches: Dict[str, list] = {}  # each frame set's batches, processed once for every evaluation

    @torch.no_grad()
    def __call__(self, step: int, epsilon: Optional[float]) -> dict:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        keep_quantized_in_train_mode(self.model)
        try:
            sums = [self._drift_sums(s, epsilon) for s in self.anchor_sets]
            sums += [self._action_sums(s) for s in self.frame_sets]
        finally:
            self.model.train(was_training)
        total = torch.tensor([x for part in sums for x in part], dtype=torch.float64)
        if dist.is_initialized() and total.numel():
            on_device = total.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            total = on_device.cpu()
        row = {"step": step, "epsilon": epsilon}
        offset = 0
        for s in self.anchor_sets:
            row.update(_drift_metrics(s.name, total[offset : offset + len(DRIFT_SUMS)].tolist(), epsilon))
            offset += len(DRIFT_SUMS)
        for s in self.frame_sets:
            row.update(_action_metrics(s.name, total[offset : offset + len(ACTION_SUMS)].tolist()))
            offset += len(ACTION_SUMS)
        row["eval_time_s"] = time.perf_counter() - t0
        return row

    def _drift_sums(self, anchors: AnchorSet, epsilon: Optional[float]) -> List[float]:
        mine = anchors.indices[self.rank :: self.world_size]
        per_rank = math.ceil(len(anchors.indices) / self.world_size)
        signal = cache_signal(anchors.cache.meta, self.loss_type)
        sums = [0.0] * len(DRIFT_SUMS)
        for start in range(0, per_rank, self.batch_size):
            indices = mine[start : start + self.batch_size]
            counted = len(indices) > 0
            rows = anchors.cache.batch(indices if counted else anchors.indices[:1])
            batch = to_device(self.anchor_inputs.for_signal(rows, signal), self.device)
            with self.autocast():
                if signal.mode == "hidden":  # the features also give their cosine to the targets
                    features = signal.targets(self.model, batch)
                    drift = signal.loss_per_anchor(features, batch[signal.target])
                    cos = F.cosine_similarity(features.float(), batch[signal.target].float(), dim=-1).sum().item()
                else:
                    drift, cos = signal.per_anchor(self.model, batch), None
            if not counted:
                continue
            drift = drift.double()
            over = (drift > epsilon).sum().item() if epsilon is not None else 0.0
            for i, value in enumerate((drift.sum().item(), over, float("nan") if cos is None else cos, len(indices))):
                sums[i] += value
        return sums

    def _action_sums(self, frame_set: FrameSet) -> List[float]:
        if frame_set.name not in self._batches:
            frames = frame_set.frames
            self._batches[frame_set.name] = list(ActionBatches(
                frames, self.tokenizer, self.processor, self.batch_size, self.collator, self.action_tokenizer,
            )) if len(frames) >= self.batch_size else []
        batches = self._batches[frame_set.name]
        mine = batches[self.rank :: self.world_size]
        per_rank = math.ceil(len(batches) / self.world_size)
        sums = [0.0] * len(ACTION_SUMS)
        for k in range(per_rank):
            counted = k < len(mine)
            batch = to_device(mine[k] if counted else batches[0], self.device)
            with self.autocast():
                out = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"],
                                 labels=batch["labels"])
            if not counted:
                continue
            n_supervised = out.action_targets.numel()
            n_action = int(self.action_tokenizer.is_action(out.action_targets).sum().item())
            values = [out.loss.item() * n_supervised, n_supervised, 0.0, 0.0, n_action]
            if n_action:  # action_metrics averages over the action tokens: back to sums
                m = action_metrics(out.action_logits, out.action_targets, self.action_tokenizer)
                values[2:4] = m["action_accuracy"] * n_action, m["l1_loss"] * n_action
            for i, value in enumerate(values):
                sums[i] += value
        return sums


def _drift_metrics(name: str, sums: List[float], epsilon: Optional[float]) -> Dict[str, float]:
    total, over, cos, count = sums
    if count == 0:
        return {}
    out = {f"eval/{name}_L_ret": total / count}
    if epsilon is not None:
        out[f"eval/{name}_frac_over_eps"] = over / count
    if math.isfinite(cos):  # measured by hidden-state signals only
        out[f"eval/{name}_cos"] = cos / count
    return out


def _action_metrics(name: str, sums: List[float]) -> Dict[str, float]:
    ce, supervised, accuracy, l1, n_action = sums
    out = {f"eval/{name}_L_act": ce / supervised} if supervised else {}
    if n_action:
        out.update({f"eval/{name}_action_accuracy": accuracy / n_action, f"eval/{name}_l1": l1 / n_action})
    return out


def training_anchor_subset(num_anchors: int, size: int) -> np.ndarray:
    """`size` evenly spaced training anchors (all of them if the cache is smaller): fixed for the whole run."""
    size = min(size, num_anchors)
    return np.arange(size, dtype=np.int64) * num_anchors // max(size, 1)


def anchor_sets(cache: Optional[AnchorCache], train_subset: int) -> tuple:
    """(the anchor sets to measure, notes saying what cannot be measured)."""
    if cache is None:
        return [], ["no anchor cache given: drift metrics (eval/heldout_*, eval/train_*) are not computed"]
    sets, notes = [], []
    heldout = cache.heldout()
    if heldout is None:
        notes.append(cache.heldout_note)
    else:
        sets.append(AnchorSet("heldout", heldout, np.arange(heldout.num_anchors)))
    if train_subset > 0:
        sets.append(AnchorSet("train", cache, training_anchor_subset(cache.num_anchors, train_subset)))
    return sets, notes


def validation_frames(name: str, data_root_dir, data_mix: str, num_frames: int, shuffle_buffer_size: int,
                      seed: int) -> FrameSet:
    """The validation split of `data_mix` (the pipeline's held-out 5 % of episodes), read identically by every
    process: which process evaluates which batch is decided by the Evaluator."""
    from prismatic.vla.datasets import RLDSStream  # TensorFlow only when validation data is asked for

    def stream():
        return RLDSStream(data_root_dir, data_mix, train=False, shuffle_buffer_size=shuffle_buffer_size, seed=seed)

    return FrameSet(name, stream, num_frames)


def build_evaluator(cfg: EvalConfig, model, *, cache: Optional[AnchorCache], loss_type: str, processor, tokenizer,
                    action_tokenizer, max_length: int, data_root_dir, data_mix: Optional[str], batch_size: int,
                    device: torch.device, autocast: Callable = nullcontext, rank: int = 0, world_size: int = 1,
                    seed: int = 7) -> Evaluator:
    """The trainer's evaluator; `loss_type` is the run's retention loss type (--craft.retention_loss_type)."""
    sets, notes = anchor_sets(cache, cfg.train_anchor_subset)
    frame_sets = [validation_frames(name, data_root_dir, mix, cfg.batches * batch_size, cfg.shuffle_buffer_size, seed)
                  for name, mix in (("val", data_mix), ("retention", cfg.retention_mix)) if mix]
    return Evaluator(model, anchor_sets=sets, frame_sets=frame_sets, loss_type=loss_type, processor=processor,
                     tokenizer=tokenizer, action_tokenizer=action_tokenizer,
                     collator=PaddedCollator(tokenizer.pad_token_id, max_length), batch_size=batch_size, device=device,
                     autocast=autocast, rank=rank, world_size=world_size, notes=notes)
