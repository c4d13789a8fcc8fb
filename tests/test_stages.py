"""OpenVLA's freeze stages select exactly the parameters upstream trains."""

import pytest

from prismatic.models import OpenVLA, preset_config
from prismatic.training.stages import apply_train_stage


def _trainable_prefixes(stage):
    model = OpenVLA.from_config(preset_config("tiny"))
    params = apply_train_stage(model, stage)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == len(names)
    n_layers = model.config.num_hidden_layers
    groups = {
        "vision": any(n.startswith("vision_backbone.") for n in names),
        "projector": any(n.startswith("projector.") for n in names),
        "embed": "language_model.model.embed_tokens.weight" in names,
        "last_layer": any(n.startswith(f"language_model.model.layers.{n_layers - 1}.") for n in names),
        "other_layers": any(n.startswith("language_model.model.layers.0.") for n in names),
        "head": "language_model.lm_head.weight" in names,
    }
    return {k for k, v in groups.items() if v}


@pytest.mark.parametrize("stage,expected", [
    ("vla-full-train", {"vision", "projector", "embed", "last_layer", "other_layers", "head"}),
    ("vla-train", {"projector", "embed", "last_layer", "other_layers", "head"}),
    ("vla-sandwich-train", {"vision", "projector", "embed", "last_layer", "head"}),
    ("vla-last-layer-train", {"embed", "last_layer", "head"}),
])
def test_stages(stage, expected):
    assert _trainable_prefixes(stage) == expected


def test_unknown_stage():
    with pytest.raises(ValueError, match="--vla.train_stage"):
        apply_train_stage(OpenVLA.from_config(preset_config("tiny")), "vla-everything")
