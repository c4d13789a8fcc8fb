"""Batched action prediction: greedy decoding of the action tokens, then OpenVLA's un-normalisation.

Upstream decodes one example at a time. Here rows of different prompt lengths share a batch: the multimodal
sequences are left-aligned so every row's next token sits in the last column, and each row gets its own
position ids (counting from its first real token), so a row decodes exactly as it would alone.
`model` is an OpenVLA (prismatic.models.vla, whose `predict_action` method calls in here), so this module does
not import it back.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import SPACE_TOKEN_ID, PaddedCollator, prompt_ids
from prismatic.models.processor import ImageProcessor


def action_stats(norm_stats: dict[str, Any] | None, unnorm_key: str | None) -> dict[str, Any]:
    """The "action" statistics of one dataset; `unnorm_key` may be omitted only when there is a single one."""
    if not norm_stats:
        raise ValueError("the model config has no norm_stats: load a checkpoint with dataset statistics")
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise ValueError(f"the checkpoint has statistics for {len(keys)} datasets; pass unnorm_key, one of {keys}")
        unnorm_key = keys[0]
    if unnorm_key not in norm_stats:
        raise ValueError(f"unknown unnorm_key {unnorm_key!r}; the checkpoint has statistics for {keys}")
    return norm_stats[unnorm_key]["action"]


def unnormalize_actions(normalized: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """[-1, 1] -> [q01, q99] where `mask` is True (all dims if absent); masked-out dims (the gripper) stay raw."""
    q01, q99 = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)


def _left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each right-padded row so its padding comes first and its last real token ends the row."""
    length = mask.shape[1]
    shift = length - mask.sum(dim=1, keepdim=True)
    index = (torch.arange(length, device=mask.device) - shift) % length
    return embeds.gather(1, index[..., None].expand_as(embeds)), mask.gather(1, index)


@torch.no_grad()
def greedy_action_ids(model: nn.Module, pixel_values: torch.Tensor, prompts: Sequence[list[int]],
                      n: int) -> torch.Tensor:
    """[B, n] greedy (full-vocabulary argmax, as upstream) continuations of the prompts, with a KV cache."""
    llm = model.language_model
    device = llm.get_input_embeddings().weight.device
    batch = PaddedCollator(model.config.pad_token_id, max_length=model.config.llm_max_length)(prompts)
    embeds, mask = model.embed_multimodal(
        pixel_values.to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device)
    )
    embeds, mask = _left_align(embeds, mask)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache, generated = None, []
    for _ in range(n):
        out = llm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        cache, next_ids = out.cache, out.logits[:, -1].argmax(dim=-1)
        generated.append(next_ids)
        embeds = llm.get_input_embeddings()(next_ids[:, None])
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(generated, dim=1)


def predict_action(
    model: nn.Module,
    images,
    instructions: str | Sequence[str],
    tokenizer,
    unnorm_key: str | None = None,
    processor: ImageProcessor | None = None,
) -> np.ndarray:
    """Actions [B, action_dim] in the units of dataset `unnorm_key`, one row per (image, instruction).

    `images`: uint8 [B, H, W, 3] or a list of uint8 [H, W, 3] arrays / PIL images; a single image goes with a
    single instruction string. The prompt is OpenVLA's, ending "Out:" + "▁" (29871). `processor` defaults to
    the model's own (the checkpoint's preprocessor_config.json when the model was loaded from one).
    """
    if isinstance(instructions, str):
        images, instructions = [images], [instructions]
    if len(images) != len(instructions):
        raise ValueError(f"got {len(images)} images for {len(instructions)} instructions")
    stats = action_stats(model.config.norm_stats, unnorm_key)
    pixel_values = (processor or model.image_processor)(images)
    prompts = [prompt_ids(tokenizer, text) + [SPACE_TOKEN_ID] for text in instructions]
    token_ids = greedy_action_ids(model, pixel_values, prompts, n=len(stats["q01"]))
    action_tokenizer = ActionTokenizer(n_bins=model.config.n_action_bins, vocab_size=model.config.base_vocab_size)
    return unnormalize_actions(action_tokenizer.decode(token_ids.cpu().numpy()), stats)
