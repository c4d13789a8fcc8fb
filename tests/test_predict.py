"""predict_action: batched greedy decoding equals row-by-row decoding, and OpenVLA's un-normalisation."""

import copy

import numpy as np
import pytest
import torch

import prismatic.models  # noqa: F401  (installs the torchvision import guard before timm/transformers)
from prismatic.models import ImageProcessor, OpenVLA, build_tiny_tokenizer, preset_config
from prismatic.models import predict
from prismatic.models.batching import SPACE_TOKEN_ID, prompt_ids
from prismatic.models.predict import greedy_action_ids

NORM_STATS = {
    "bridge_orig": {
        "action": {
            "q01": [-0.03, -0.04, -0.02, -0.1, -0.12, -0.2, 0.0],
            "q99": [0.03, 0.05, 0.04, 0.1, 0.11, 0.25, 1.0],
            "mask": [True] * 6 + [False],
        }
    },
    "no_mask": {"action": {"q01": [-2.0] * 7, "q99": [3.0] * 7}},
}
INSTRUCTIONS = ["pick up the cup", "Open The Top Drawer and put the bowl inside", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    """Tiny model whose greedy tokens are action tokens that depend on the image and the prompt."""
    torch.manual_seed(0)
    config = preset_config("tiny")
    config.norm_stats = NORM_STATS
    vla = OpenVLA.from_config(config).eval()
    with torch.no_grad():
        for name, p in vla.named_parameters():
            if p.ndim == 2 and name.startswith(("language_model", "projector")):
                p.normal_(0, 0.3)  # the default init is too small for the context to matter
        vla.language_model.lm_head.weight[:31744] = 0  # every action logit beats the (zero) others...
        vla.language_model.lm_head.weight[32000:] = 0  # ...almost surely
    return vla


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(3, 60, 80, 3), dtype=np.uint8)


def _prompts(tokenizer):
    return [prompt_ids(tokenizer, text) + [SPACE_TOKEN_ID] for text in INSTRUCTIONS]


def test_batch_equals_each_row_alone(model, tokenizer, images):
    assert len({len(p) for p in _prompts(tokenizer)}) == 3  # the batch needs padding
    batch = model.predict_action(images, INSTRUCTIONS, tokenizer, unnorm_key="bridge_orig")
    assert batch.shape == (3, 7)
    for i, text in enumerate(INSTRUCTIONS):
        alone = model.predict_action(images[i], text, tokenizer, unnorm_key="bridge_orig")
        assert alone.shape == (1, 7) and np.array_equal(alone[0], batch[i]), i
    assert len({tuple(row) for row in batch}) == 3  # the rows really differ


def test_cached_decoding_matches_full_recompute(model, tokenizer, images):
    pixel_values = ImageProcessor(model.config)(images)
    prompts = _prompts(tokenizer)
    ids = greedy_action_ids(model, pixel_values, prompts, n=7)
    for i, prompt in enumerate(prompts):
        seq = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(7):  # the final-norm output at the last position, through lm_head
                last = model.hidden_states(pixel_values[i : i + 1], seq, None, layers=(-1,))[0][0, -1]
                next_id = model.language_model.lm_head(last).argmax()
                seq = torch.cat([seq, next_id.view(1, 1)], dim=1)
        assert seq[0, -7:].tolist() == ids[i].tolist(), i
    assert ((ids >= 31744) & (ids <= 31999)).all()


def test_unnormalisation_matches_hand_computation(model, tokenizer, images):
    ids = greedy_action_ids(model, ImageProcessor(model.config)(images), _prompts(tokenizer), n=7).numpy()
    bins = np.linspace(-1, 1, 256)
    normalized = ((bins[:-1] + bins[1:]) / 2)[np.clip(32000 - ids - 1, 0, 254)]
    for key in NORM_STATS:
        stats = NORM_STATS[key]["action"]
        q01, q99 = np.array(stats["q01"]), np.array(stats["q99"])
        expected = 0.5 * (normalized + 1) * (q99 - q01) + q01
        actions = model.predict_action(images, INSTRUCTIONS, tokenizer, unnorm_key=key)
        if key == "bridge_orig":  # mask False on the gripper: returned raw, in [-1, 1]
            np.testing.assert_array_equal(actions[:, 6], normalized[:, 6])
            np.testing.assert_allclose(actions[:, :6], expected[:, :6], rtol=1e-12, atol=0)
        else:  # no mask: every dimension is un-normalised
            np.testing.assert_allclose(actions, expected, rtol=1e-12, atol=0)


def test_unnorm_key_errors(model, tokenizer, images):
    with pytest.raises(ValueError, match=r"2 datasets; pass unnorm_key.*'bridge_orig', 'no_mask'"):
        model.predict_action(images[:1], INSTRUCTIONS[:1], tokenizer)
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'libero'.*'bridge_orig', 'no_mask'"):
        model.predict_action(images[:1], INSTRUCTIONS[:1], tokenizer, unnorm_key="libero")
    with pytest.raises(ValueError, match="2 images for 1 instructions"):
        model.predict_action(images[:2], INSTRUCTIONS[:1], tokenizer, unnorm_key="no_mask")

    single = copy.deepcopy(model)
    single.config.norm_stats = {"no_mask": NORM_STATS["no_mask"]}
    only = single.predict_action(images[:1], INSTRUCTIONS[:1], tokenizer)  # the only key is the default
    np.testing.assert_array_equal(only, model.predict_action(images[:1], INSTRUCTIONS[:1], tokenizer, "no_mask"))
    single.config.norm_stats = None
    with pytest.raises(ValueError, match="no norm_stats"):
        single.predict_action(images[:1], INSTRUCTIONS[:1], tokenizer)


def test_default_processor_is_the_models_own(model, tokenizer, images, monkeypatch):
    """A loaded checkpoint's processor (its preprocessor_config.json) is the one predictions use by default."""
    seen = []
    monkeypatch.setattr(predict, "greedy_action_ids", lambda m, pixels, prompts, n: seen.append(pixels) or
                        torch.full((len(prompts), n), 31800))  # fmt: skip
    own = ImageProcessor(model.config, means=[[0.4, 0.5, 0.6], [0.5] * 3], stds=[[0.2, 0.3, 0.25], [0.5] * 3])
    monkeypatch.setattr(model, "image_processor", own)
    model.predict_action(images, INSTRUCTIONS, tokenizer, unnorm_key="bridge_orig")
    model.predict_action(images, INSTRUCTIONS, tokenizer, unnorm_key="bridge_orig", processor=own)
    model.predict_action(images, INSTRUCTIONS, tokenizer, unnorm_key="bridge_orig",
                         processor=ImageProcessor(model.config))  # fmt: skip
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
