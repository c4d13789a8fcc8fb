"""The `--craft.*` flags: the single source of truth for CRaFT's defaults."""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

RETENTION_MODES = ("hidden", "action")
POOLINGS = ("mean_image_tokens", "mean_all_tokens", "last_token")
# Per mode: the loss types it accepts, the first being its default. nmse = MSE / the target's mean square (per
# anchor and layer): a relative drift, so one epsilon means the same on every model and layer. kl = KL(pretrained
# || current) of the action-token distributions, in nats.
MODE_LOSS_TYPES = {"hidden": ("mse", "nmse", "cosine"), "action": ("kl",)}
RETENTION_LOSS_TYPES = tuple(t for types in MODE_LOSS_TYPES.values() for t in types)
EPSILON_SCHEDULES = ("constant", "linear", "cosine")
STASH_DTYPES = ("float32", "bfloat16")
STEP_IMPLS = ("two_pass", "one_pass")
DUAL_UPDATES = ("gradient_ascent", "pi")
VIOLATIONS = ("absolute", "relative")


class CraftConfigError(ValueError):
    """A `--craft.*` flag or the anchor cache does not fit the run; the message names the flag."""


@dataclass
class CraftConfig:
    enabled: bool = True
    # What is kept: "hidden" = the pooled LLM hidden state of `hidden_layer` (or of each of `hidden_layers`);
    # "action" = the pretrained model's distribution over the action bins at each action token of the anchors.
    retention_mode: str = "hidden"
    anchor_cache_dir: Optional[Path] = None
    pooling: str = "mean_image_tokens"
    # hidden: mse | nmse | cosine; action: kl. Default (null): the mode's first (mse, kl).
    retention_loss_type: Optional[str] = None
    # Python index into the hidden-state tuple (embeddings, layer 1, ..., layer n): -2 = layer n-1.
    hidden_layer: int = -2
    # Several layers at once, e.g. [-1,-2]: L_ret is the mean of their losses. Empty: `hidden_layer` alone.
    hidden_layers: Tuple[int, ...] = ()
    # Drift budget L_ret <= epsilon; with a schedule, epsilon is the value reached at the end.
    epsilon: float = 0.05
    epsilon_schedule: str = "constant"
    epsilon_start: Optional[float] = None  # first value of a linear/cosine schedule (default: epsilon)
    epsilon_schedule_steps: Optional[int] = None  # steps to go from start to epsilon (default: max_steps)
    lambda_init: float = 0.0
    # Step of the dual update on the violation; with dual_update pi, the integral gain ki.
    lambda_lr: float = 1e-4
    # gradient_ascent: lambda <- [lambda + lambda_lr e]_+. pi: nuPI, adds kp (xi_t - xi_{t-1}) (craft.dual).
    dual_update: str = "gradient_ascent"
    # The violation e: absolute = L_ret - epsilon (loss units); relative = (L_ret - epsilon) / epsilon (unitless).
    violation: str = "absolute"
    lambda_kp: float = 0.0  # pi only: proportional gain on the smoothed violation xi
    violation_ema: float = 0.0  # pi only: nu in xi_t = nu xi_{t-1} + (1 - nu) e_t; 0 = no smoothing
    lambda_max: Optional[float] = None  # upper bound on lambda for either rule (None = unbounded)
    # Anchor pass, surgery and dual update every k-th step only; the other steps are plain behaviour cloning.
    retention_interval: int = 1
    # false: never project g_act (the "lambda only" ablation); grad_dot and grad_cos are still logged.
    conflict_projection: bool = True
    anchor_batch_size: int = 4  # per device and micro-batch
    anchor_seed: int = 0
    # The stashed action gradient, CRaFT's one extra gradient-sized buffer: None keeps the gradients'
    # dtype; "bfloat16" halves it at a small cost in grad_dot accuracy (see benchmarks/RESULTS.md).
    grad_stash_dtype: Optional[str] = None
    # two_pass: separate action and anchor forward/backward (the reference). one_pass: one forward/backward
    # over [action; anchor] rows with row-group weight gradients (same result, one larger batch instead of
    # two small latency-bound ones; under FSDP the anchor gradient gets its own reduce-scatter per unit).
    step_impl: str = "two_pass"
    # With --vla.enable_gradient_checkpointing, also recompute the (two_pass) anchor pass. Off: the small
    # anchor batch keeps its activations (about 1.8 GB per anchor for 7B) and skips the recomputation
    # (0.15 s instead of 0.25 s for A=4 on an H200, see benchmarks/RESULTS.md).
    anchor_checkpointing: bool = False
    # Under FSDP with two_pass: the weights every unit gathers for the action backward stay gathered through the
    # anchor pass, which then all-gathers nothing (two all-gathers fewer per unit and step) at the memory of one
    # unsharded copy of the weights while it runs. Changes no value; no effect on a single process.
    keep_weights_gathered: bool = False

    @property
    def layers(self) -> Tuple[int, ...]:
        return tuple(self.hidden_layers) or (self.hidden_layer,)

    @property
    def loss_type(self) -> str:
        return self.retention_loss_type or MODE_LOSS_TYPES.get(self.retention_mode, ("mse",))[0]

    def validate(self) -> None:
        """Reject values that would make the run meaningless, before any model or data is touched. Resolves the
        retention loss type to the mode's default, so that the saved configuration names it."""
        if self.retention_loss_type is None and self.retention_mode in MODE_LOSS_TYPES:
            self.retention_loss_type = self.loss_type
        if not self.enabled:
            return
        _choice("retention_mode", self.retention_mode, RETENTION_MODES)
        _choice("pooling", self.pooling, POOLINGS)
        if self.loss_type not in MODE_LOSS_TYPES[self.retention_mode]:
            raise CraftConfigError(
                f"--craft.retention_loss_type must be one of {list(MODE_LOSS_TYPES[self.retention_mode])} with "
                f"--craft.retention_mode {self.retention_mode}; found {self.retention_loss_type!r}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise CraftConfigError(f"--craft.hidden_layers must not repeat a layer; found {list(self.hidden_layers)}")
        _choice("epsilon_schedule", self.epsilon_schedule, EPSILON_SCHEDULES)
        if self.anchor_cache_dir is None:
            raise CraftConfigError(
                "--craft.anchor_cache_dir is required when --craft.enabled is true "
                "(build one with vla-scripts/build_anchor_cache.py); found: not set"
            )
        _choice("step_impl", self.step_impl, STEP_IMPLS)
        if self.retention_mode == "action" and self.step_impl != "two_pass":
            raise CraftConfigError(
                "--craft.retention_mode action runs with --craft.step_impl two_pass only (its anchors are teacher-forced "
                f"sequences of their own); found --craft.step_impl {self.step_impl}"
            )
        if self.keep_weights_gathered and self.step_impl != "two_pass":
            raise CraftConfigError(
                "--craft.keep_weights_gathered applies only with --craft.step_impl two_pass (one_pass gathers the "
                f"weights once per step already); found --craft.step_impl {self.step_impl}"
            )
        if self.grad_stash_dtype is not None:
            _choice("grad_stash_dtype", self.grad_stash_dtype, STASH_DTYPES)
        _positive("epsilon", self.epsilon)
        if self.epsilon_start is not None:
            _positive("epsilon_start", self.epsilon_start)
        if self.epsilon_schedule_steps is not None and self.epsilon_schedule_steps < 1:
            raise CraftConfigError(
                f"--craft.epsilon_schedule_steps must be >= 1; found {self.epsilon_schedule_steps}"
            )
        if self.lambda_init < 0:
            raise CraftConfigError(f"--craft.lambda_init must be >= 0; found {self.lambda_init}")
        if self.lambda_lr < 0:
            raise CraftConfigError(f"--craft.lambda_lr must be >= 0; found {self.lambda_lr}")
        self._validate_dual_update()
        if self.retention_interval < 1:
            raise CraftConfigError(f"--craft.retention_interval must be >= 1; found {self.retention_interval}")
        if self.anchor_batch_size < 1:
            raise CraftConfigError(
                f"--craft.anchor_batch_size must be >= 1; found {self.anchor_batch_size}"
            )

    def _validate_dual_update(self) -> None:
        _choice("dual_update", self.dual_update, DUAL_UPDATES)
        _choice("violation", self.violation, VIOLATIONS)
        if self.lambda_kp < 0:
            raise CraftConfigError(f"--craft.lambda_kp must be >= 0; found {self.lambda_kp}")
        if not 0 <= self.violation_ema < 1:
            raise CraftConfigError(f"--craft.violation_ema must be in [0, 1); found {self.violation_ema}")
        if self.dual_update != "pi":
            for flag, value in (("lambda_kp", self.lambda_kp), ("violation_ema", self.violation_ema)):
                if value != 0:
                    raise CraftConfigError(
                        f"--craft.{flag} applies only with --craft.dual_update pi; found --craft.{flag} {value} "
                        f"with --craft.dual_update {self.dual_update}"
                    )
        if self.lambda_max is not None:
            _positive("lambda_max", self.lambda_max)
            if self.lambda_init > self.lambda_max:
                raise CraftConfigError(
                    f"--craft.lambda_init must be <= --craft.lambda_max; found {self.lambda_init} > {self.lambda_max}"
                )


def _choice(flag: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise CraftConfigError(f"--craft.{flag} must be one of {list(allowed)}; found {value!r}")


def _positive(flag: str, value: float) -> None:
    if not value > 0:
        raise CraftConfigError(f"--craft.{flag} must be > 0; found {value}")
