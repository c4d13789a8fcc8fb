"""From frames to model batches: OpenVLA's prompt, its loss mask, and the right-padding collator."""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from prismatic.models.action_tokenizer import ActionTokenizer

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross-entropy default)
SPACE_TOKEN_ID = 29871  # Llama-2's lone "▁": the prompt ends with "Out: " before the action tokens


def prompt_text(instruction: str) -> str:
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


def prompt_ids(tokenizer, instruction: str) -> List[int]:
    """BOS + the inference prompt, up to and including "Out:"."""
    ids = tokenizer(prompt_text(instruction), add_special_tokens=True).input_ids
    if ids[0] != tokenizer.bos_token_id:
        raise ValueError(f"the tokenizer must prepend BOS ({tokenizer.bos_token_id}); got ids starting {ids[:3]}")
    return ids


def training_example(tokenizer, action_tokenizer: ActionTokenizer, instruction: str, action: np.ndarray):
    """ids = prompt + "▁" + 7 action tokens + EOS; only the action tokens and EOS carry loss."""
    return action_sequence(prompt_ids(tokenizer, instruction), action_tokenizer.encode(action).tolist(),
                           tokenizer.eos_token_id)


def action_sequence(prompt: List[int], action_ids: List[int], eos_token_id: int):
    """(ids, labels) of an already tokenised prompt followed by "▁", the action tokens and EOS."""
    ids = prompt + [SPACE_TOKEN_ID] + action_ids + [eos_token_id]
    labels = [IGNORE_INDEX] * (len(prompt) + 1) + action_ids + [eos_token_id]
    return ids, labels


@dataclass
class PaddedCollator:
    """Right-pads ids with the pad id and labels with IGNORE_INDEX; truncates to `max_length`."""

    pad_token_id: int
    max_length: int = 2048

    def __call__(self, ids: Sequence[List[int]], labels: Sequence[List[int]] = None) -> Dict[str, torch.Tensor]:
        n = min(max(len(x) for x in ids), self.max_length)
        input_ids = torch.full((len(ids), n), self.pad_token_id, dtype=torch.long)
        out_labels = torch.full((len(ids), n), IGNORE_INDEX, dtype=torch.long)
        for i, x in enumerate(ids):
            x = x[:n]
            input_ids[i, : len(x)] = torch.tensor(x)
            if labels is not None:
                out_labels[i, : len(x)] = torch.tensor(labels[i][:n])
        batch = {"input_ids": input_ids, "attention_mask": input_ids != self.pad_token_id}
        if labels is not None:
            batch["labels"] = out_labels
        return batch
