"""Builds the anchor cache offline from the pretrained model: inputs and pooled target features."""

import itertools
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from craft.anchor_cache import AnchorCacheWriter
from craft.config import POOLINGS, CraftConfigError
from craft.retention import anchor_features
from prismatic.models import ImageProcessor, VLAModelConfig, load_pretrained
from prismatic.training.batches import anchor_inputs
from prismatic.training.preflight import resolve_device
from prismatic.vla.batching import PaddedCollator, prompt_ids
from prismatic.vla.datasets import RLDSStream, check_data_root, resolve_mixture

DTYPES = ("float32", "bfloat16")


@dataclass
class AnchorCacheConfig:
    pretrained_checkpoint: Optional[Path] = None  # the model BEFORE fine-tuning
    data_root_dir: Path = Path("datasets/rlds")
    data_mix: str = "libero_90"  # any registered mixture
    output_dir: Optional[Path] = None
    num_anchors: int = 512
    hidden_layer: int = -2
    pooling: str = "mean_image_tokens"
    dtype: str = "bfloat16"  # the training compute dtype (bf16 with --vla.enable_mixed_precision_training)
    batch_size: int = 16
    shuffle_buffer_size: int = 10_000
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False

    def validate(self) -> None:
        """Everything that can be wrong, checked before the model is loaded."""
        config_file = Path(self.pretrained_checkpoint or "") / "config.json"
        if self.pretrained_checkpoint is None or not config_file.is_file():
            raise ValueError(f"--pretrained_checkpoint must be a checkpoint folder with config.json; "
                             f"found {self.pretrained_checkpoint}")
        n_states = VLAModelConfig.from_dict(json.loads(config_file.read_text())).num_hidden_layers + 1
        if not -n_states <= self.hidden_layer < n_states:
            raise ValueError(f"--hidden_layer must be in [{-n_states}, {n_states - 1}] for this model; "
                             f"found {self.hidden_layer}")
        if self.output_dir is None:
            raise ValueError("--output_dir is required; found: not set")
        if Path(self.output_dir).exists() and any(Path(self.output_dir).iterdir()) and not self.overwrite:
            raise FileExistsError(f"--output_dir {self.output_dir} already exists and is not empty; choose another "
                                  "folder or pass --overwrite true")
        if self.pooling not in POOLINGS:
            raise CraftConfigError(f"--pooling must be one of {list(POOLINGS)}; found {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}; found {self.dtype!r}")
        if self.num_anchors < 1 or self.batch_size < 1:
            raise ValueError(f"--num_anchors and --batch_size must be >= 1; found {self.num_anchors}, {self.batch_size}")
        resolve_mixture(self.data_mix)
        check_data_root(self.data_root_dir, self.data_mix)


@torch.no_grad()
def build_anchor_cache(cfg: AnchorCacheConfig) -> Path:
    """Assumes `cfg.validate()` passed."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer, model_config = load_pretrained(cfg.pretrained_checkpoint, dtype=torch.float32, device=device)
    model.eval()
    processor = ImageProcessor(model_config)

    stream = RLDSStream(cfg.data_root_dir, cfg.data_mix, train=True, shuffle_buffer_size=cfg.shuffle_buffer_size,
                        seed=cfg.seed)
    frames = list(itertools.islice(iter(stream), cfg.num_anchors))
    prompts = [prompt_ids(tokenizer, f["instruction"]) for f in frames]
    collated = PaddedCollator(tokenizer.pad_token_id, model_config.llm_max_length)(prompts)
    writer = AnchorCacheWriter(cfg.output_dir, cfg.num_anchors, frames[0]["image"].shape,
                               collated["input_ids"].shape[1], model_config.hidden_size, overwrite=cfg.overwrite)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    for start in tqdm(range(0, cfg.num_anchors, cfg.batch_size), desc="anchor features", unit="batch"):
        sl = slice(start, start + cfg.batch_size)
        rows = {
            "images": np.stack([f["image"] for f in frames[sl]]),
            "input_ids": collated["input_ids"][sl].numpy().astype(np.int32),
            "attention_mask": collated["attention_mask"][sl].numpy(),
        }
        batch = {k: v.to(device) for k, v in anchor_inputs(rows, processor).items()}
        with autocast:
            features = anchor_features(model, batch, cfg.hidden_layer, cfg.pooling)
        writer.append({**rows, "target_features": features.cpu().numpy()}, [f["instruction"] for f in frames[sl]])
    meta = {
        "hidden_layer": cfg.hidden_layer,
        "pooling": cfg.pooling,
        "dtype": cfg.dtype,
        "retention_mode": "hidden",
        "model": {"checkpoint": str(Path(cfg.pretrained_checkpoint).resolve()),
                  "vision_backbone_id": model_config.vision_backbone_id,
                  "llm_backbone_id": model_config.llm_backbone_id,
                  "num_hidden_layers": model_config.num_hidden_layers},
        "data": {"data_root_dir": str(Path(cfg.data_root_dir).resolve()), "data_mix": cfg.data_mix,
                 "datasets": [name for name, _ in resolve_mixture(cfg.data_mix)], "seed": cfg.seed},
    }
    out = writer.close(meta)
    print(json.dumps({"anchor_cache": str(out), "num_anchors": cfg.num_anchors,
                      "hidden_dim": model_config.hidden_size}), flush=True)
    return out
