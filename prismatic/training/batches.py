"""Model-ready batches: action micro-batches from the RLDS stream, anchor batches from the cache."""

from typing import Dict, Iterator

import numpy as np
import torch

from craft.anchor_cache import AnchorCache, anchor_indices
from prismatic.models.vla import IGNORE_INDEX
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator, training_example


class ActionBatches:
    """Groups stream frames into padded, tokenised micro-batches of `batch_size` samples."""

    def __init__(self, frames, tokenizer, processor, batch_size: int, collator: PaddedCollator,
                 action_tokenizer: ActionTokenizer):
        self.frames: Iterator[dict] = iter(frames)
        self.tokenizer, self.processor, self.collator = tokenizer, processor, collator
        self.action_tokenizer, self.batch_size = action_tokenizer, batch_size

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        frames = [next(self.frames) for _ in range(self.batch_size)]
        examples = [training_example(self.tokenizer, self.action_tokenizer, f["instruction"], f["action"])
                    for f in frames]
        batch = self.collator([ids for ids, _ in examples], [labels for _, labels in examples])
        batch["pixel_values"] = self.processor(np.stack([f["image"] for f in frames]))
        return batch


def anchor_inputs(rows: Dict[str, np.ndarray], processor) -> Dict[str, torch.Tensor]:
    """Anchor rows from the cache -> exactly the inputs the model saw when the cache was built."""
    return {
        "pixel_values": processor(rows["images"]),
        "input_ids": torch.from_numpy(rows["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(np.asarray(rows["attention_mask"], dtype=bool)),
    }


class AnchorBatches:
    """This rank's anchor micro-batches by draw number, so a resumed run draws what the first run would have."""

    def __init__(self, cache: AnchorCache, processor, batch_size: int, seed: int, rank: int, world_size: int):
        self.cache, self.processor, self.batch_size = cache, processor, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def draw(self, draw: int) -> Dict[str, torch.Tensor]:
        indices = anchor_indices(draw, self.batch_size, self.cache.num_anchors, self.seed, rank=self.rank,
                                 world_size=self.world_size)
        rows = self.cache.batch(indices)
        return {**anchor_inputs(rows, self.processor), "target_features": torch.from_numpy(rows["target_features"])}


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def joint_batch(action: Dict[str, torch.Tensor], anchors: Dict[str, torch.Tensor], pad_token_id: int) -> Dict:
    """[action rows; anchor rows] right-padded to one length; anchor rows carry no action labels."""
    length = max(action["input_ids"].shape[1], anchors["input_ids"].shape[1])

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    anchor_labels = torch.full_like(anchors["input_ids"], IGNORE_INDEX)
    return {
        "pixel_values": torch.cat([action["pixel_values"], anchors["pixel_values"]]),
        "input_ids": torch.cat([pad(action["input_ids"], pad_token_id), pad(anchors["input_ids"], pad_token_id)]),
        "attention_mask": torch.cat([pad(action["attention_mask"], False), pad(anchors["attention_mask"], False)]),
        "labels": torch.cat([pad(action["labels"], IGNORE_INDEX), pad(anchor_labels, IGNORE_INDEX)]),
        "target_features": anchors["target_features"],
        "n_action_rows": action["input_ids"].shape[0],
    }
