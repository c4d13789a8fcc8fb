"""How micro-batches become losses and one optimizer step: the single definition that the trainer, the
step benchmark and the distributed tests run.

It owns the choices that must agree wherever a step is taken: bf16 autocast, the anchor pass keeping its
activations unless --craft.anchor_checkpointing, the retention signal (`craft.retention`, the same object that
built the anchor cache's targets), a penalty added to the action gradient (L2-SP), one-pass CRaFT's joint
[action; anchor] batch and its row-group split, and how the gradients are reduced across processes. Imports neither TensorFlow nor draccus: the step
benchmark runs where neither is installed.
"""

from contextlib import ExitStack, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from craft.config import CraftConfig
from craft.dual import RetentionConstraint
from craft.one_pass import RowGroupSplit
from craft.retention import retention_signal
from craft.step import Collective, Regularizer, StepResult, baseline_step, craft_step, craft_step_one_pass
from prismatic.training.batches import joint_batch
from prismatic.training.distributed import DistEnv, FSDPCollective
from prismatic.training.metrics import action_metrics
from prismatic.models.action_tokenizer import ActionTokenizer

ACTION_METRICS = ("action_accuracy", "l1_loss")


class Objective:
    """The losses of one model under one CRaFT configuration, and the step that combines them."""

    def __init__(self, model, craft: CraftConfig, *, device: torch.device, autocast_dtype: Optional[torch.dtype],
                 max_grad_norm: float, collective: Collective, split: Optional[RowGroupSplit],
                 regularize: Regularizer = None):
        self.model, self.craft, self.device = model, craft, device
        self.autocast_dtype, self.max_grad_norm = autocast_dtype, max_grad_norm
        self.collective, self.split, self.regularize = collective, split, regularize
        self.signal = retention_signal(craft.retention_mode, layers=craft.layers, pooling=craft.pooling,
                                       loss_type=craft.loss_type)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stash_dtype = getattr(torch, craft.grad_stash_dtype) if craft.grad_stash_dtype else None
        self.action_tokenizer = ActionTokenizer(n_bins=model.config.n_action_bins)

    @classmethod
    def build(cls, model, craft: CraftConfig, *, env: DistEnv, device: torch.device, sharding_strategy: str,
              autocast_dtype: Optional[torch.dtype], gradient_checkpointing: bool,
              max_grad_norm: float, regularize: Regularizer = None) -> "Objective":
        """For a model already in train mode and, when sharded, wrapped by FSDP: adds one-pass CRaFT's row
        split (around checkpointed recomputation too) and the collective that makes results global."""
        split = None
        if craft.enabled and craft.step_impl == "one_pass":
            split = RowGroupSplit(action_only=[model.language_model.lm_head], model=model)
            if gradient_checkpointing:  # the recomputed forward must be split too
                model.gradient_checkpointing_enable(context_fn=split.recompute_context)
        collective = FSDPCollective(model, env, device, sharding_strategy, split, craft.keep_weights_gathered) \
            if isinstance(model, FSDPModule) else Collective()
        return cls(model, craft, device=device, autocast_dtype=autocast_dtype, max_grad_norm=max_grad_norm,
                   collective=collective, split=split, regularize=regularize)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def anchor_pass(self):
        """The anchor batch is small: without --craft.anchor_checkpointing it keeps its activations. Under FSDP
        with --craft.keep_weights_gathered its forward leaves the weights gathered for its backward."""
        stack = ExitStack()
        if not self.craft.anchor_checkpointing:
            stack.enter_context(self.model.activation_checkpointing_paused())
        stack.enter_context(self.collective.anchor_forward())
        return stack

    def action(self, batch: dict) -> "ActionLoss":
        return ActionLoss(self, batch)

    def retention(self, batch: dict) -> "RetentionLoss":
        return RetentionLoss(self, batch)

    def joint(self, action: dict, anchors: dict) -> "JointLoss":
        return JointLoss(self, action, anchors)

    def step(self, optimizer, constraint: Optional[RetentionConstraint], actions: Sequence[dict],
             anchors: Sequence[dict], next_step: Optional[int] = None) -> Tuple[StepResult, Dict[str, Optional[float]]]:
        """One update from this rank's micro-batches: CRaFT's when a constraint is given, else the plain
        baseline's. `next_step`: the training step of the constraint's next update (see craft.step.craft_step).
        Returns the step's result and the mean action metrics of its micro-batches."""
        losses: List[Union[ActionLoss, JointLoss]]
        surgery = dict(project=self.craft.conflict_projection, next_step=next_step, regularize=self.regularize)
        if constraint is None:
            losses = [self.action(b) for b in actions]
            result = baseline_step(self.params, optimizer, losses, self.max_grad_norm, self.collective,
                                   self.regularize)
        elif self.split is not None:
            losses = [self.joint(a, r) for a, r in zip(actions, anchors)]
            result = craft_step_one_pass(self.params, optimizer, constraint, [j.as_joint() for j in losses],
                                         self.split, self.max_grad_norm, self.collective, self.stash_dtype, **surgery)
        else:
            losses = [self.action(b) for b in actions]
            result = craft_step(self.params, optimizer, constraint, losses, [self.retention(b) for b in anchors],
                                self.max_grad_norm, self.collective, self.stash_dtype, **surgery)
        return result, mean_action_metrics(losses)

    def _action_metrics(self, out) -> Dict[str, float]:
        return action_metrics(out.action_logits.detach(), out.action_targets, self.action_tokenizer)


class ActionLoss:
    """L_act of one action micro-batch; once called, `metrics` holds its action accuracy and L1 error."""

    def __init__(self, objective: Objective, batch: dict):
        self.objective, self.batch = objective, batch
        self.metrics: Optional[Dict[str, float]] = None

    def __call__(self) -> torch.Tensor:
        b = self.batch
        with self.objective.autocast():
            out = self.objective.model(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"])
        self.metrics = self.objective._action_metrics(out)
        return out.loss


class RetentionLoss:
    """L_ret of one anchor micro-batch: the drift of what the retention signal reads from the cached targets."""

    def __init__(self, objective: Objective, batch: dict):
        self.objective, self.batch = objective, batch

    def __call__(self) -> torch.Tensor:
        o = self.objective
        with o.autocast(), o.anchor_pass():
            return o.signal(o.model, self.batch)


class JointLoss:
    """(L_act, L_ret) from one forward over [action rows; anchor rows]; `metrics` as for ActionLoss."""

    def __init__(self, objective: Objective, action: dict, anchors: dict):
        self.objective = objective
        self.batch = joint_batch(action, anchors, objective.model.config.pad_token_id)
        self.n_action_rows, self.rows = self.batch["n_action_rows"], self.batch["input_ids"].shape[0]
        self.metrics: Optional[Dict[str, float]] = None

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        o, b = self.objective, self.batch
        with o.autocast():
            out = o.model(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"],
                          output_hidden_states=True)
        self.metrics = o._action_metrics(out)
        return out.loss, o.signal.from_hidden_states(out.hidden_states, o.model.image_token_slice, b,
                                                     slice(self.n_action_rows, None))

    def as_joint(self):
        """The (forward, action rows, rows) triple craft.step.craft_step_one_pass takes."""
        return self, self.n_action_rows, self.rows


def mean_action_metrics(losses: Sequence[Union[ActionLoss, JointLoss]]) -> Dict[str, Optional[float]]:
    """Over this rank's micro-batches (rank 0 logs); None when none was computed."""
    done = [loss.metrics for loss in losses if loss.metrics is not None]
    return {key: float(np.mean([m[key] for m in done])) if done else None for key in ACTION_METRICS}
