"""OpenVLA: fused ViT features, projected into Llama-2's embedding space and spliced in after BOS.

The LLM sees `[embed(BOS), 256 projected patches, embed(input_ids[:, 1:])]`; the attention mask and the labels
get 256 entries (True / IGNORE_INDEX) at the same place, so callers work in text-token coordinates only.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

from prismatic.models.batching import IGNORE_INDEX
from prismatic.models.config import VLAModelConfig
from prismatic.models.predict import predict_action
from prismatic.models.processor import ImageProcessor
from prismatic.models.projector import FusedMLPProjector
from prismatic.models.vision import FusedVisionBackbone


def _splice(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Insert `image` ([B, 256, ...]) into `text` ([B, T, ...]) right after position 0 (the BOS token)."""
    return torch.cat([text[:, :1], image, text[:, 1:]], dim=1)


@dataclass
class VLAOutput:
    """`action_logits`/`action_targets` list the supervised positions in row-major (batch, position) order, the
    same order as `labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]` on the text-only labels."""

    loss: torch.Tensor | None = None  # mean float32 next-token cross-entropy over supervised positions
    action_logits: torch.Tensor | None = None  # [N, V] float32, lm_head applied only where supervised
    action_targets: torch.Tensor | None = None  # [N]
    logits: torch.Tensor | None = None  # [B, T+256, V] float32, only when no labels are given
    hidden_states: tuple[torch.Tensor, ...] | None = None  # see OpenVLA.forward


class OpenVLA(nn.Module):
    def __init__(self, config: VLAModelConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = FusedVisionBackbone(config)
        llm_config = config.llama_config()
        self.projector = FusedMLPProjector(self.vision_backbone.embed_dim, llm_config.hidden_size)
        self.language_model = LlamaForCausalLM(llm_config)
        # How this model's images are prepared; load_pretrained installs the checkpoint's own.
        self.image_processor = ImageProcessor(config)

    @classmethod
    def from_config(cls, config: VLAModelConfig) -> OpenVLA:
        """Randomly initialised; under `torch.device("meta")` it allocates nothing (see checkpoint.load_pretrained)."""
        return cls(config)

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def image_token_slice(self) -> slice:
        """Where the projected patches sit in the multimodal sequence."""
        return slice(1, 1 + self.num_image_tokens)

    def gradient_checkpointing_enable(self, context_fn: Callable | None = None) -> None:
        """Recompute activations in the backward pass, per LLM decoder layer and per ViT block.

        Without `context_fn`: transformers' and timm's own (non-reentrant) checkpointing. With one
        (torch.utils.checkpoint's, to re-enter a caller's context such as the one-pass row split while the
        forward is recomputed in the backward): each unit's `forward` wrapped in non-reentrant
        `torch.utils.checkpoint`, weights and state-dict names untouched, FSDP hooks outside.
        """
        llm, vision = self.language_model, self.vision_backbone
        units = (*llm.model.layers, *vision.featurizer.blocks, *vision.fused_featurizer.blocks)
        for unit in units:
            unit.__dict__.pop("forward", None)  # undo an earlier wrapping
        self._builtin_checkpointing(context_fn is None)
        if context_fn is not None:
            for unit in units:
                unit.forward = functools.partial(checkpoint, type(unit).forward.__get__(unit), use_reentrant=False,
                                                 context_fn=context_fn)

    def _builtin_checkpointing(self, on: bool) -> None:
        llm, vision = self.language_model, self.vision_backbone
        # transformers 5.2x renamed gradient_checkpointing_{enable,disable} (now deprecated aliases); older 5.x
        # lack the new names.
        if on:
            enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        else:
            disable = getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable
            disable()
        vision.featurizer.set_grad_checkpointing(on)
        vision.fused_featurizer.set_grad_checkpointing(on)

    @contextmanager
    def activation_checkpointing_paused(self):
        """Forward passes inside keep their activations: a small batch's backward without recomputation."""
        vision = self.vision_backbone
        flags = [(m, "gradient_checkpointing") for m in self.language_model.modules()
                 if getattr(m, "gradient_checkpointing", False) is True]
        flags += [(v, "grad_checkpointing") for v in (vision.featurizer, vision.fused_featurizer) if v.grad_checkpointing]
        for module, attr in flags:
            setattr(module, attr, False)
        try:
            yield
        finally:
            for module, attr in flags:
                setattr(module, attr, True)

    def embed_multimodal(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LLM's input embeddings [B, T+256, D] and attention mask [B, T+256] (None stays None)."""
        vision_dtype = self.vision_backbone.featurizer.patch_embed.proj.weight.dtype
        patches = self.projector(self.vision_backbone(pixel_values.to(vision_dtype)))
        text_embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = _splice(text_embeds, patches.to(text_embeds.dtype))
        if attention_mask is not None:
            image_mask = attention_mask.new_ones((attention_mask.shape[0], patches.shape[1]))
            attention_mask = _splice(attention_mask, image_mask)
        return embeds, attention_mask

    def _run_llm(self, pixel_values, input_ids, attention_mask, output_hidden_states: bool):
        embeds, attention_mask = self.embed_multimodal(pixel_values, input_ids, attention_mask)
        return self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> VLAOutput:
        """pixel_values [B, 6, 224, 224]; input_ids, attention_mask (None: attend everywhere), labels: [B, T].

        With labels, only the supervised positions go through lm_head, so the [B, T+256, V] logits are never
        built. `hidden_states` (if asked) has n_layers + 1 entries [B, T+256, D]: [0] the input embeddings,
        [i] the output of decoder layer i for i < n_layers, and [n_layers] the output of the final RMSNorm
        (transformers 5.x replaces the last layer's raw output with it, as 4.40 did). So [-2] is the output
        of the second-to-last decoder layer.
        """
        out = self._run_llm(pixel_values, input_ids, attention_mask, output_hidden_states)
        hidden_states = out.hidden_states if output_hidden_states else None
        lm_head = self.language_model.lm_head
        if labels is None:
            return VLAOutput(logits=lm_head(out.last_hidden_state).float(), hidden_states=hidden_states)

        image_labels = labels.new_full((labels.shape[0], self.num_image_tokens), IGNORE_INDEX)
        targets = _splice(labels, image_labels)[:, 1:]  # position p predicts token p + 1
        supervised = targets != IGNORE_INDEX
        action_logits = lm_head(out.last_hidden_state[:, :-1][supervised]).float()
        action_targets = targets[supervised]
        loss = F.cross_entropy(action_logits, action_targets)
        return VLAOutput(loss, action_logits, action_targets, hidden_states=hidden_states)

    def predict_action(self, images, instructions, tokenizer, unnorm_key: str | None = None, processor=None):
        """Greedy-decoded, un-normalised actions [B, action_dim]; see `prismatic.models.predict.predict_action`."""
        return predict_action(self, images, instructions, tokenizer, unnorm_key, processor)

    def hidden_states(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        layers: tuple[int, ...],
    ) -> list[torch.Tensor]:
        """Entries `layers` (Python indexing) of forward's `hidden_states` tuple, each [B, T+256, D], from one
        forward without lm_head."""
        n = self.language_model.config.num_hidden_layers
        bad = [layer for layer in layers if not -(n + 1) <= layer <= n]
        if bad or not layers:
            raise ValueError(f"layers must be in [{-(n + 1)}, {n}] for a {n}-layer LLM, got {list(layers)}")
        hidden = self._run_llm(pixel_values, input_ids, attention_mask, output_hidden_states=True).hidden_states
        return [hidden[layer] for layer in layers]
