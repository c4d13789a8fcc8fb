"""The anchor pass feeds only BOS and the image when pooling over image tokens: same features, same gradients."""

import pytest
import torch

import prismatic.models  # noqa: F401  (installs the torchvision import guard before timm/transformers)
from craft.retention import anchor_features, retention_loss
from prismatic.models import OpenVLA, preset_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenVLA.from_config(preset_config("tiny")).double().train()


def _anchors():
    """Three right-padded prompts of different lengths, as the anchor cache stores them."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 31000, (3, 12), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    return {"pixel_values": torch.randn(3, 6, 224, 224, generator=g, dtype=torch.float64), "input_ids": ids,
            "attention_mask": mask}


def _full_sequence_features(model, batch, layer):
    """The definition: image-token mean of the hidden states of the whole prompt."""
    hidden = model.hidden_states(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], layers=(layer,))[0]
    return hidden[:, model.image_token_slice].mean(dim=1)


def _llm_lengths(model):
    lengths = []
    hook = model.language_model.model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    return lengths, hook


@pytest.mark.parametrize("layer", [-2, -1, 1])
def test_prefix_features_and_gradients_equal_the_full_prompt(model, layer):
    batch = _anchors()
    targets = torch.randn(3, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(features):
        return torch.autograd.grad(retention_loss(features, targets, "mse"), params, allow_unused=True)

    lengths, hook = _llm_lengths(model)
    try:
        prefix = anchor_features(model, batch, (layer,), "mean_image_tokens")
    finally:
        hook.remove()
    full = _full_sequence_features(model, batch, layer)
    assert lengths == [1 + model.num_image_tokens]  # BOS and the patches, no prompt positions
    # Features and the loss are float32 (pool_hidden), so both agree to float32 rounding; a prefix that changed
    # the image positions' hidden states would differ by orders of magnitude more.
    torch.testing.assert_close(prefix, full.float(), rtol=1e-6, atol=1e-7)
    flat = [torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                       for p, g in zip(params, gs)]) for gs in (grads(prefix), grads(full))]
    assert flat[1].norm() > 0
    assert (flat[0] - flat[1]).norm() <= 1e-6 * flat[1].norm()


@pytest.mark.parametrize("pooling", ["mean_all_tokens", "last_token"])
def test_poolings_that_read_the_prompt_see_all_of_it(model, pooling):
    batch = _anchors()
    lengths, hook = _llm_lengths(model)
    try:
        with torch.no_grad():
            anchor_features(model, batch, (-2,), pooling)
    finally:
        hook.remove()
    assert lengths == [batch["input_ids"].shape[1] + model.num_image_tokens]
