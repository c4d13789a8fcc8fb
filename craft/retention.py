"""The retention signals: what `L_ret` compares on the anchors, and against which cached pretrained targets.

One object per `--craft.retention_mode`, each naming the cache array that holds its targets:
- `HiddenSignal` (here): pooled LLM hidden states of one or several layers, against `target_features`;
- `ActionSignal` (craft/action_retention.py): the action-token distributions, against `target_logprobs`.
The cache builder, the training step and the evaluation all call the same object, so the targets, the
training-time loss and the measured drift are one computation.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from craft.action_retention import ActionSignal
from craft.config import MODE_LOSS_TYPES, POOLINGS


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


def anchor_features(model, batch: dict, layers: Sequence[int], pooling: str) -> torch.Tensor:
    """Pooled features of anchor inputs [B, len(layers) * D], the layers side by side, from one forward.

    With `mean_image_tokens` only the text before the image (BOS) is fed: in a causal LLM the image positions
    never attend to the prompt that follows them, so their features are the same and the anchor pass skips
    the prompt's positions."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    if pooling == "mean_image_tokens":
        keep = model.image_token_slice.start
        input_ids, mask = input_ids[:, :keep], None if mask is None else mask[:, :keep]
    hidden = model.hidden_states(batch["pixel_values"], input_ids, mask, layers=tuple(layers))
    return torch.cat([pool_hidden(h, pooling, model.image_token_slice, mask) for h in hidden], dim=-1)


def retention_loss_per_anchor(features: torch.Tensor, targets: torch.Tensor, loss_type: str,
                              num_layers: int = 1) -> torch.Tensor:
    """[B] drift of each anchor: the loss of each of the `num_layers` feature blocks, averaged over the blocks.
    nmse divides each block's MSE by the target block's mean square, so it is a relative drift."""
    features = features.float().unflatten(-1, (num_layers, -1))
    targets = targets.float().unflatten(-1, (num_layers, -1))
    if loss_type == "mse":
        per_layer = (features - targets).pow(2).mean(dim=-1)
    elif loss_type == "nmse":
        per_layer = (features - targets).pow(2).mean(dim=-1) / targets.pow(2).mean(dim=-1)
    elif loss_type == "cosine":
        per_layer = 1.0 - F.cosine_similarity(features, targets, dim=-1)
    else:
        raise ValueError(f"retention_loss_type must be one of {list(MODE_LOSS_TYPES['hidden'])}; found {loss_type!r}")
    return per_layer.mean(dim=-1)


def retention_loss(features: torch.Tensor, targets: torch.Tensor, loss_type: str, num_layers: int = 1) -> torch.Tensor:
    """Scalar drift of `features` [B, L*D] from `targets` [B, L*D], averaged over the anchor batch."""
    return retention_loss_per_anchor(features, targets, loss_type, num_layers).mean()


class HiddenSignal:
    """Pooled hidden states of `layers`; the loss of several layers is the mean of each layer's."""

    mode = "hidden"
    target = "target_features"
    teacher_forced = False  # the anchors are prompts alone

    def __init__(self, layers: Sequence[int], pooling: str, loss_type: str):
        self.layers, self.pooling, self.loss_type = tuple(layers), pooling, loss_type

    def targets(self, model, batch: dict) -> torch.Tensor:
        return anchor_features(model, batch, self.layers, self.pooling)

    def loss_per_anchor(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return retention_loss_per_anchor(features, targets, self.loss_type, len(self.layers))

    def per_anchor(self, model, batch: dict) -> torch.Tensor:
        return self.loss_per_anchor(self.targets(model, batch), batch[self.target])

    def __call__(self, model, batch: dict) -> torch.Tensor:
        return self.per_anchor(model, batch).mean()

    def from_hidden_states(self, hidden_states: Tuple[torch.Tensor, ...], image_slice: slice, batch: dict,
                           rows: slice) -> torch.Tensor:
        """L_ret of the anchor `rows` of a joint forward that returned every hidden state (one-pass CRaFT)."""
        features = torch.cat([pool_hidden(hidden_states[layer][rows], self.pooling, image_slice,
                                          batch["attention_mask"][rows]) for layer in self.layers], dim=-1)
        return retention_loss(features, batch[self.target], self.loss_type, len(self.layers))


def retention_signal(mode: str, *, layers: Sequence[int] = (-2,), pooling: str = "mean_image_tokens",
                     loss_type: str = None):
    """The signal of `--craft.retention_mode`; `loss_type` None is the mode's default."""
    loss_type = loss_type or MODE_LOSS_TYPES[mode][0]
    if mode == "action":
        return ActionSignal()
    if mode == "hidden":
        return HiddenSignal(layers, pooling, loss_type)
    raise ValueError(f"retention_mode must be one of {list(MODE_LOSS_TYPES)}; found {mode!r}")


def cache_signal(meta: dict, loss_type: str = None):
    """The signal an anchor cache was built for (caches from before retention modes hold one hidden layer);
    `loss_type` applies where the cache's mode accepts it, else the mode's default is used."""
    mode = meta.get("retention_mode", "hidden")
    if loss_type not in MODE_LOSS_TYPES.get(mode, ()):
        loss_type = None
    if mode == "hidden":
        return retention_signal(mode, layers=cache_layers(meta), pooling=meta["pooling"], loss_type=loss_type)
    return retention_signal(mode, loss_type=loss_type)


def cache_layers(meta: dict) -> Tuple[int, ...]:
    return tuple(meta.get("hidden_layers") or (meta["hidden_layer"],))
