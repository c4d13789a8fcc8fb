"""`--vla.*`: what is trained, on which data, with which optimisation hyper-parameters.

One dataclass per concern (model, LoRA/quantisation, data, optimisation, retention baselines), each with its own defaults and
checks; `VLAConfig` joins them under the one `--vla.` prefix users already type.
"""

from dataclasses import dataclass
from typing import Optional

import draccus

TRAIN_STAGES = ("vla-full-train", "vla-train", "vla-sandwich-train", "vla-last-layer-train")
LR_SCHEDULES = ("constant", "linear-warmup+cosine-decay")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass
class ModelConfig:
    vla_id: str = "openvla-7b+libero"
    # Which parameters train (OpenVLA's stages): full; frozen vision; frozen LLM but its last
    # layer; only the last LLM layer (embed_tokens, last decoder layer, lm_head).
    train_stage: str = "vla-full-train"
    enable_gradient_checkpointing: bool = True
    enable_mixed_precision_training: bool = True  # bf16 autocast; also the anchor cache's dtype

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.enable_mixed_precision_training else "float32"

    def validate_model(self) -> None:
        if self.train_stage not in TRAIN_STAGES:
            raise ValueError(f"--vla.train_stage must be one of {list(TRAIN_STAGES)}; found {self.train_stage!r}")


@dataclass
class LoraConfig:
    # LoRA: a frozen base (bf16 with mixed precision) and trainable adapters; CRaFT's surgery then runs
    # over the adapter gradients only, while L_ret still reads the full model's hidden states.
    use_lora: bool = False
    lora_rank: int = 32
    lora_alpha: Optional[int] = None  # default min(lora_rank, 16), as OpenVLA's LoRA recipe
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # or comma-separated Linear name suffixes, e.g. "q_proj,v_proj"
    merge_on_save: bool = True  # also write base+adapters merged, in the plain OpenVLA layout, at each save
    # With LoRA in one process: "8bit" or "4bit" (NF4) frozen base Linear layers via bitsandbytes.
    base_quantization: str = "none"

    @property
    def resolved_lora_alpha(self) -> int:
        return self.lora_alpha or min(self.lora_rank, 16)

    @property
    def lora_scaling(self) -> float:
        return self.resolved_lora_alpha / self.lora_rank

    def validate_lora(self, world_size: int) -> None:
        if self.use_lora and (self.lora_rank < 1 or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"--vla.lora_rank must be >= 1 and --vla.lora_dropout in [0, 1); found "
                             f"{self.lora_rank}, {self.lora_dropout}")
        q = self.base_quantization
        if q not in QUANTIZATIONS:
            raise ValueError(f"--vla.base_quantization must be one of {list(QUANTIZATIONS)}; found {q!r}")
        if q == "none":
            return
        for wrong, needed in ((not self.use_lora, "--vla.use_lora true (only a frozen base is quantized)"),
                              (world_size > 1, f"one process (found {world_size}; shard a bf16 base instead)"),
                              (self.merge_on_save, "--vla.merge_on_save false (a merge into the quantized base "
                                                   "would carry its rounding into the export)")):
            if wrong:
                raise ValueError(f"--vla.base_quantization {q} needs {needed}")


@dataclass
class DataConfig:
    data_mix: str = "libero_90"
    shuffle_buffer_size: int = 100_000


@dataclass
class OptimConfig:
    max_steps: int = 50_000
    expected_world_size: Optional[int] = None  # when set, the launch must match it
    global_batch_size: Optional[int] = None  # default: per_device_batch_size x world size
    per_device_batch_size: int = 8
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0

    def grad_accumulation_steps(self, world_size: int) -> int:
        per_step = self.per_device_batch_size * world_size
        total = self.global_batch_size or per_step
        if total % per_step:
            raise ValueError(
                f"--vla.global_batch_size {total} is not a multiple of --vla.per_device_batch_size "
                f"{self.per_device_batch_size} x world size {world_size} = {per_step}"
            )
        return total // per_step

    def validate_optim(self, world_size: int) -> None:
        if self.lr_scheduler_type not in LR_SCHEDULES:
            raise ValueError(f"--vla.lr_scheduler_type must be one of {list(LR_SCHEDULES)}; "
                             f"found {self.lr_scheduler_type!r}")
        for flag, value in (("max_steps", self.max_steps), ("per_device_batch_size", self.per_device_batch_size)):
            if value < 1:
                raise ValueError(f"--vla.{flag} must be >= 1; found {value}")
        if self.learning_rate < 0:
            raise ValueError(f"--vla.learning_rate must be >= 0; found {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--vla.warmup_ratio must be in [0, 1); found {self.warmup_ratio}")
        if self.expected_world_size is not None and self.expected_world_size != world_size:
            raise ValueError(
                f"--vla.expected_world_size is {self.expected_world_size} but torchrun started {world_size} processes"
            )
        self.grad_accumulation_steps(world_size)


@dataclass
class RetentionBaselinesConfig:
    """What users pick instead of (or beside) CRaFT to keep pretrained behaviour, in the same trainer."""

    # L2-SP: every trainable weight is pulled toward its pretrained value (read from --pretrained_checkpoint): the
    # gradient gains l2_sp_weight * (w - w0), i.e. the loss gains l2_sp_weight / 2 * ||w - w0||^2.
    l2_sp_weight: float = 0.0
    # Anchor replay: this many anchor frames (from --craft.anchor_cache_dir, with their recorded actions) join every
    # action micro-batch; L_act is then the loss over the joint frames. 0 = off.
    replay_batch_size: int = 0

    def validate_baselines(self, use_lora: bool) -> None:
        if self.l2_sp_weight < 0:
            raise ValueError(f"--vla.l2_sp_weight must be >= 0; found {self.l2_sp_weight}")
        if self.l2_sp_weight > 0 and use_lora:
            raise ValueError("--vla.l2_sp_weight pulls weights toward their pretrained values, which LoRA's adapters "
                             "do not have: use it with --vla.use_lora false; found --vla.use_lora true")
        if self.replay_batch_size < 0:
            raise ValueError(f"--vla.replay_batch_size must be >= 0; found {self.replay_batch_size}")


@dataclass
class VLAConfig(ModelConfig, LoraConfig, DataConfig, OptimConfig, RetentionBaselinesConfig, draccus.ChoiceRegistry):
    @classmethod
    def default_choice_name(cls) -> str:
        """The user's templates never pass --vla.type."""
        return "openvla-7b+libero"

    def validate(self, world_size: int) -> None:
        self.validate_model()
        self.validate_optim(world_size)
        self.validate_lora(world_size)
        self.validate_baselines(self.use_lora)


@VLAConfig.register_subclass("openvla-7b+libero")
@dataclass
class OpenVLALiberoConfig(VLAConfig):
    """Full fine-tuning of OpenVLA-7B on LIBERO-90, upstream's full-FT hyper-parameters."""
