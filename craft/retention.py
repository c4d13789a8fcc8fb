"""The retention loss: pooled hidden features of anchor inputs against cached pretrained targets."""

import torch
import torch.nn.functional as F

from craft.config import POOLINGS, RETENTION_LOSS_TYPES


def sequence_mask(text_attention_mask: torch.Tensor, image_slice: slice) -> torch.Tensor:
    """Validity mask over the multimodal sequence: image tokens are inserted at `image_slice`."""
    b = text_attention_mask.shape[0]
    n_image = image_slice.stop - image_slice.start
    ones = text_attention_mask.new_ones(b, n_image)
    head, tail = text_attention_mask[:, : image_slice.start], text_attention_mask[:, image_slice.start :]
    return torch.cat([head, ones, tail], dim=1).bool()


def pool_hidden(
    hidden: torch.Tensor, pooling: str, image_slice: slice, text_attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B, S, D] hidden states -> [B, D] features, in float32 whatever the compute dtype."""
    hidden = hidden.float()
    if pooling == "mean_image_tokens":
        return hidden[:, image_slice].mean(dim=1)
    mask = sequence_mask(text_attention_mask, image_slice)
    if pooling == "mean_all_tokens":
        w = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1)
    if pooling == "last_token":
        last = mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last valid position
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {list(POOLINGS)}; found {pooling!r}")


def anchor_features(model, batch: dict, hidden_layer: int, pooling: str) -> torch.Tensor:
    """Pooled features of anchor inputs [B, D]: the one function that makes the cache's targets, the
    training-time features compared with them, and the evaluation's drift.

    With `mean_image_tokens` only the text before the image (BOS) is fed: in a causal LLM the image positions
    never attend to the prompt that follows them, so their features are the same and the anchor pass skips
    the prompt's positions."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    if pooling == "mean_image_tokens":
        keep = model.image_token_slice.start
        input_ids, mask = input_ids[:, :keep], None if mask is None else mask[:, :keep]
    hidden = model.hidden_states(batch["pixel_values"], input_ids, mask, layer=hidden_layer)
    return pool_hidden(hidden, pooling, model.image_token_slice, mask)


def retention_loss(features: torch.Tensor, targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Scalar drift of `features` [B, D] from `targets` [B, D], averaged over the anchor batch."""
    features, targets = features.float(), targets.float()
    if loss_type == "mse":
        return F.mse_loss(features, targets)
    if loss_type == "cosine":
        return (1.0 - F.cosine_similarity(features, targets, dim=-1)).mean()
    raise ValueError(f"retention_loss_type must be one of {list(RETENTION_LOSS_TYPES)}; found {loss_type!r}")


def retention_loss_per_anchor(features: torch.Tensor, targets: torch.Tensor, loss_type: str) -> torch.Tensor:
    """[B] drift of each anchor on its own; the batch mean is `retention_loss`. Evaluation needs the per-anchor
    view to count anchors over the budget."""
    features, targets = features.float(), targets.float()
    if loss_type == "mse":
        return (features - targets).pow(2).mean(dim=-1)
    if loss_type == "cosine":
        return 1.0 - F.cosine_similarity(features, targets, dim=-1)
    raise ValueError(f"retention_loss_type must be one of {list(RETENTION_LOSS_TYPES)}; found {loss_type!r}")
