"""Builds the anchor cache offline from the pretrained model: inputs and pooled target features."""

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from craft.anchor_cache import HELDOUT_DIR, AnchorCacheWriter
from craft.config import POOLINGS, RETENTION_MODES, CraftConfigError
from craft.retention import retention_signal
from prismatic.models import VLAModelConfig, load_pretrained
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.training.batches import AnchorInputs
from prismatic.training.preflight import resolve_device
from prismatic.models.batching import PaddedCollator, prompt_ids
from prismatic.vla.datasets import RLDSStream, check_data_root, resolve_mixture

DTYPES = ("float32", "bfloat16")
HELDOUT_SHARE = 0.1  # default held-out anchors, as a share of --num_anchors
FRAMES_PER_ANCHOR_LIMIT = 100  # frames read per wanted anchor before giving up on the episode split


@dataclass
class AnchorCacheConfig:
    pretrained_checkpoint: Optional[Path] = None  # the model BEFORE fine-tuning
    data_root_dir: Path = Path("datasets/rlds")
    data_mix: str = "libero_90"  # any registered mixture
    output_dir: Optional[Path] = None
    num_anchors: int = 512
    # Anchors from episodes disjoint from the training anchors' ones, stored in <output_dir>/heldout/ for
    # evaluation only. Default (null): a tenth of --num_anchors, at least 1; 0 = none.
    num_heldout_anchors: Optional[int] = None
    # The targets cached: "hidden" = pooled hidden states of --hidden_layer (or of each of --hidden_layers, e.g.
    # [-1,-2]) under --pooling; "action" = the action-bin distributions at each anchor's recorded action tokens.
    retention_mode: str = "hidden"
    hidden_layer: int = -2
    hidden_layers: Tuple[int, ...] = ()
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
        if self.retention_mode not in RETENTION_MODES:
            raise CraftConfigError(f"--retention_mode must be one of {list(RETENTION_MODES)}; found "
                                   f"{self.retention_mode!r}")
        n_states = VLAModelConfig.from_dict(json.loads(config_file.read_text())).num_hidden_layers + 1
        for layer in self.layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"--{'hidden_layers' if self.hidden_layers else 'hidden_layer'} must be in "
                                 f"[{-n_states}, {n_states - 1}] for this model; found {layer}")
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
        if self.num_heldout_anchors is not None and self.num_heldout_anchors < 0:
            raise ValueError(f"--num_heldout_anchors must be >= 0 (or null for 10% of --num_anchors); found "
                             f"{self.num_heldout_anchors}")
        resolve_mixture(self.data_mix)
        check_data_root(self.data_root_dir, self.data_mix)

    @property
    def layers(self) -> Tuple[int, ...]:
        return tuple(self.hidden_layers) or (self.hidden_layer,)

    def signal(self):
        return retention_signal(self.retention_mode, layers=self.layers, pooling=self.pooling)

    @property
    def heldout_anchors(self) -> int:
        if self.num_heldout_anchors is not None:
            return self.num_heldout_anchors
        return max(1, round(HELDOUT_SHARE * self.num_anchors))


def split_by_episode(frames: Iterable[dict], num_anchors: int, num_heldout: int, data_mix: str
                     ) -> Tuple[List[dict], List[dict]]:
    """(training anchors, held-out anchors) from a frame stream, no episode giving frames to both.

    Each newly seen episode joins the held-out side while that side holds fewer than its share of the
    episodes seen (and still needs anchors); its frames then go to that side only, until the side is full.
    """
    share = num_heldout / (num_anchors + num_heldout)
    train, heldout, is_heldout = [], [], {}
    limit = FRAMES_PER_ANCHOR_LIMIT * (num_anchors + num_heldout)
    for seen, frame in enumerate(frames):
        if len(train) == num_anchors and len(heldout) == num_heldout:
            return train, heldout
        if seen == limit:
            break
        episode = frame["episode_id"]
        if episode not in is_heldout:
            held_episodes = sum(is_heldout.values())
            is_heldout[episode] = len(heldout) < num_heldout and (
                len(train) == num_anchors or held_episodes < share * (len(is_heldout) + 1))
        side, size = (heldout, num_heldout) if is_heldout[episode] else (train, num_anchors)
        if len(side) < size:
            side.append(frame)
    raise ValueError(
        f"--num_heldout_anchors {num_heldout}: found only {len(train)} training and {len(heldout)} held-out anchors "
        f"from disjoint episodes in the first {limit} frames of --data_mix {data_mix} (episodes seen: {len(is_heldout)}"
        "): the data has too few episodes for both sets; lower --num_heldout_anchors (0 = none)"
    )


@torch.no_grad()
def build_anchor_cache(cfg: AnchorCacheConfig) -> Path:
    """Assumes `cfg.validate()` passed."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, tokenizer, model_config = load_pretrained(cfg.pretrained_checkpoint, dtype=torch.float32, device=device)
    model.eval()
    processor = model.image_processor  # the checkpoint's own normalisation, as training and inference use

    stream = RLDSStream(cfg.data_root_dir, cfg.data_mix, train=True, shuffle_buffer_size=cfg.shuffle_buffer_size,
                        seed=cfg.seed)
    frames, heldout = split_by_episode(iter(stream), cfg.num_anchors, cfg.heldout_anchors, cfg.data_mix)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
    signal = cfg.signal()
    meta = {
        "retention_mode": cfg.retention_mode,
        **({"hidden_layer": cfg.layers[0], "hidden_layers": list(cfg.layers), "pooling": cfg.pooling}
           if cfg.retention_mode == "hidden" else {"n_action_bins": model_config.n_action_bins}),
        "hidden_dim": model_config.hidden_size,
        "dtype": cfg.dtype,
        "num_episodes": len({f["episode_id"] for f in frames}),
        "model": {"checkpoint": str(Path(cfg.pretrained_checkpoint).resolve()),
                  "vision_backbone_id": model_config.vision_backbone_id,
                  "llm_backbone_id": model_config.llm_backbone_id,
                  "num_hidden_layers": model_config.num_hidden_layers,
                  "image_means": processor.means, "image_stds": processor.stds},
        "data": {"data_root_dir": str(Path(cfg.data_root_dir).resolve()), "data_mix": cfg.data_mix,
                 "datasets": [name for name, _ in resolve_mixture(cfg.data_mix)], "seed": cfg.seed},
    }
    inputs = AnchorInputs(processor, ActionTokenizer(n_bins=model_config.n_action_bins), tokenizer.eos_token_id,
                          tokenizer.pad_token_id)

    def fill(out_dir: Path, anchors: List[dict], overwrite: bool, desc: str) -> AnchorCacheWriter:
        prompts = [prompt_ids(tokenizer, f["instruction"]) for f in anchors]
        collated = PaddedCollator(tokenizer.pad_token_id, model_config.llm_max_length)(prompts)
        writer = None
        for start in tqdm(range(0, len(anchors), cfg.batch_size), desc=desc, unit="batch"):
            sl = slice(start, start + cfg.batch_size)
            rows = {
                "images": np.stack([f["image"] for f in anchors[sl]]),
                "input_ids": collated["input_ids"][sl].numpy().astype(np.int32),
                "attention_mask": collated["attention_mask"][sl].numpy(),
                "actions": np.stack([f["action"] for f in anchors[sl]]).astype(np.float32),
            }
            batch = {k: v.to(device) for k, v in inputs.for_signal(rows, signal).items()}
            with autocast:
                rows[signal.target] = signal.targets(model, batch).float().cpu().numpy()
            if writer is None:  # the targets' shape is known once the model has produced some
                writer = AnchorCacheWriter(out_dir, {name: (len(anchors), *r.shape[1:]) for name, r in rows.items()},
                                           overwrite=overwrite)
            writer.append(rows, [f["instruction"] for f in anchors[sl]], [f["episode_id"] for f in anchors[sl]])
        return writer

    writer = fill(Path(cfg.output_dir), frames, cfg.overwrite, "anchor features")
    if heldout:  # written inside the unpublished folder, so both sets appear together or not at all
        held_meta = {**meta, "role": "heldout", "num_episodes": len({f["episode_id"] for f in heldout})}
        try:
            fill(writer.tmp_dir / HELDOUT_DIR, heldout, False, "held-out anchor features").close(held_meta)
        except BaseException:
            writer.discard()
            raise
        meta["heldout"] = {"dir": HELDOUT_DIR, "num_anchors": len(heldout), "num_episodes": held_meta["num_episodes"],
                           "episodes": "disjoint from the training anchors' episodes"}
    out = writer.close(meta)
    print(json.dumps({"anchor_cache": str(out), "retention_mode": cfg.retention_mode, "num_anchors": cfg.num_anchors,
                      "num_heldout_anchors": len(heldout), "target": signal.target}), flush=True)
    return out
