"""Model-ready batches: action micro-batches from the RLDS stream, anchor batches from the cache."""

from dataclasses import dataclass
from typing import Callable, Dict, Iterator

import numpy as np
import torch

from craft.anchor_cache import AnchorCache, anchor_indices
from prismatic.models.vla import IGNORE_INDEX
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator, action_sequence, training_example


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
    """Anchor rows from the cache -> exactly the inputs the model saw when the cache was built (the prompt)."""
    return {
        "pixel_values": processor(rows["images"]),
        "input_ids": torch.from_numpy(rows["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(np.asarray(rows["attention_mask"], dtype=bool)),
    }


@dataclass
class AnchorInputs:
    """Cache rows -> model inputs, the one definition that the cache builder, training and evaluation share: the
    prompt alone, or the prompt followed by the anchor's recorded action as a training sequence ("▁", the action
    tokens, EOS), labelled on the action tokens (teacher forcing for the action signal) or, for replay, on the
    action tokens and EOS like any training frame."""

    processor: object
    action_tokenizer: ActionTokenizer
    eos_token_id: int
    pad_token_id: int

    def with_actions(self, rows: Dict[str, np.ndarray], label_eos: bool) -> Dict[str, torch.Tensor]:
        examples = []
        for ids, mask, action in zip(rows["input_ids"], rows["attention_mask"], rows["actions"]):
            prompt = ids[: int(np.sum(mask))].tolist()
            ids, labels = action_sequence(prompt, self.action_tokenizer.encode(action).tolist(), self.eos_token_id)
            examples.append((ids, labels if label_eos else labels[:-1] + [IGNORE_INDEX]))
        batch = PaddedCollator(self.pad_token_id)([e[0] for e in examples], [e[1] for e in examples])
        return {**batch, "pixel_values": self.processor(rows["images"])}

    def for_signal(self, rows: Dict[str, np.ndarray], signal) -> Dict[str, torch.Tensor]:
        """What `signal` reads, with its cached targets when `rows` hold them."""
        inputs = self.with_actions(rows, label_eos=False) if signal.teacher_forced else \
            anchor_inputs(rows, self.processor)
        if signal.target in rows:
            inputs[signal.target] = torch.from_numpy(np.asarray(rows[signal.target]))
        return inputs

    def replay(self, rows: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
        return self.with_actions(rows, label_eos=True)


class AnchorBatches:
    """This rank's anchor micro-batches by draw number, so a resumed run draws what the first run would have;
    `make` turns the drawn cache rows into model inputs."""

    def __init__(self, cache: AnchorCache, make: Callable[[Dict[str, np.ndarray]], Dict[str, torch.Tensor]],
                 batch_size: int, seed: int, rank: int, world_size: int):
        self.cache, self.make, self.batch_size = cache, make, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def draw(self, draw: int) -> Dict[str, torch.Tensor]:
        indices = anchor_indices(draw, self.batch_size, self.cache.num_anchors, self.seed, rank=self.rank,
                                 world_size=self.world_size)
        return self.make(self.cache.batch(indices))


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def stack_rows(top: Dict[str, torch.Tensor], bottom: Dict[str, torch.Tensor], pad_token_id: int) -> Dict:
    """[top rows; bottom rows] right-padded to one length; rows without labels get none."""
    length = max(top["input_ids"].shape[1], bottom["input_ids"].shape[1])

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    def labels(b):
        return b["labels"] if "labels" in b else torch.full_like(b["input_ids"], IGNORE_INDEX)

    return {
        "pixel_values": torch.cat([top["pixel_values"], bottom["pixel_values"]]),
        "input_ids": torch.cat([pad(top["input_ids"], pad_token_id), pad(bottom["input_ids"], pad_token_id)]),
        "attention_mask": torch.cat([pad(top["attention_mask"], False), pad(bottom["attention_mask"], False)]),
        "labels": torch.cat([pad(labels(top), IGNORE_INDEX), pad(labels(bottom), IGNORE_INDEX)]),
    }


def joint_batch(action: Dict[str, torch.Tensor], anchors: Dict[str, torch.Tensor], pad_token_id: int) -> Dict:
    """[action rows; anchor rows] right-padded to one length; anchor rows carry no action labels."""
    prompts = {k: anchors[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    return {**stack_rows(action, prompts, pad_token_id), "target_features": anchors["target_features"],
            "n_action_rows": action["input_ids"].shape[0]}
