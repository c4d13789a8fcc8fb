"""Model side: presets, fused vision features, multimodal sequence, loss, hidden states, processor, tokenizer."""

import contextlib
import copy
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import prismatic.models  # noqa: F401  (installs the torchvision import guard before timm/transformers)
from prismatic.models import (
    IGNORE_INDEX,
    ImageProcessor,
    OpenVLA,
    VLAModelConfig,
    build_tiny_tokenizer,
    load_tokenizer,
    preset_config,
)
from prismatic.models.processor import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD

N_IMG = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenVLA.from_config(preset_config("tiny")).eval()


@pytest.fixture(scope="module")
def batch():
    """Two right-padded sequences: BOS, prompt, then 4 supervised tokens; the second has 3 pad positions."""
    g = torch.Generator().manual_seed(1)
    B, T = 2, 14
    input_ids = torch.randint(3, 31000, (B, T), generator=g)
    input_ids[:, 0] = 1
    attention_mask = torch.ones(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, 10:14] = input_ids[0, 10:14]
    input_ids[1, 11:] = 32000
    attention_mask[1, 11:] = False
    labels[1, 7:11] = input_ids[1, 7:11]
    pixel_values = torch.randn(B, 6, 224, 224, generator=g)
    return pixel_values, input_ids, attention_mask, labels


def test_presets_and_config_round_trip():
    with pytest.raises(ValueError, match="openvla-7b.*tiny|tiny.*openvla-7b"):
        preset_config("nope")
    for name in ("openvla-7b", "tiny"):
        cfg = preset_config(name)
        assert VLAModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.num_image_tokens == N_IMG and cfg.text_config["vocab_size"] == 32064
    cfg = preset_config("openvla-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.llama_config().rms_norm_eps) == (4096, 32, 1e-5)
    preset_config("tiny").text_config["hidden_size"] = 1  # presets are handed out as copies
    assert preset_config("tiny").hidden_size == 64


def test_config_keeps_unknown_keys_and_fills_llama_defaults():
    # transformers writes nested configs as a diff from the defaults, so text_config may be this short.
    d = preset_config("openvla-7b").to_dict()
    d["text_config"] = {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064}
    d["auto_map"] = {"AutoConfig": "configuration_prismatic.OpenVLAConfig"}
    d["transformers_version"] = "4.40.1"
    cfg = VLAModelConfig.from_dict(d)
    assert cfg.to_dict() == d
    assert cfg.auto_map == d["auto_map"] and cfg.extra == {"transformers_version": "4.40.1"}
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.llama_config().rms_norm_eps) == (4096, 32, 1e-6)


def test_openvla_7b_on_meta_device():
    with torch.device("meta"):
        vla = OpenVLA.from_config(preset_config("openvla-7b"))
    n_params = sum(p.numel() for p in vla.parameters())
    print(f"openvla-7b parameters: {n_params:,}")
    assert 7.4e9 < n_params < 7.7e9
    assert n_params == 7_541_237_184  # DINOv2-L 303.2M + SigLIP-So400m 427.7M + projector 71.4M + Llama 6738.9M
    assert vla.projector.fc1.weight.shape == (8704, 2176)
    assert vla.projector.fc3.weight.shape == (4096, 4096)
    assert vla.language_model.lm_head.weight.shape == (32064, 4096)
    assert vla.language_model.model.embed_tokens.weight.shape == (32064, 4096)
    assert vla.vision_backbone.embed_dim == 2176
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in vla.state_dict()}
    assert prefixes == {
        "vision_backbone.featurizer",
        "vision_backbone.fused_featurizer",
        "projector.fc1",
        "projector.fc2",
        "projector.fc3",
        "language_model.model",
        "language_model.lm_head",
    }


def test_vision_backbone_uses_second_to_last_block(model):
    vision = model.vision_backbone
    px = torch.randn(2, 6, 224, 224)
    last_block_runs = []
    hook = vision.featurizer.blocks[-1].register_forward_hook(lambda *a: last_block_runs.append(1))
    with torch.no_grad():
        fused = vision(px)
        hook.remove()
        # timm 1.0's DINO-compatible interface runs every block, so it is an independent reference.
        dino, siglip = (
            vit.get_intermediate_layers(x, n=[len(vit.blocks) - 2])[0]
            for vit, x in ((vision.featurizer, px[:, :3]), (vision.fused_featurizer, px[:, 3:]))
        )
    assert last_block_runs == []  # truncated: blocks after the one used never run
    assert fused.shape == (2, N_IMG, 64) and dino.shape == (2, N_IMG, 32)
    torch.testing.assert_close(fused, torch.cat([dino, siglip], dim=2), rtol=0, atol=0)


def test_forward_backward_shapes(batch):
    torch.manual_seed(0)
    vla = OpenVLA.from_config(preset_config("tiny"))
    out = vla(*batch)
    n_supervised = int((batch[3][:, 1:] != IGNORE_INDEX).sum())
    assert out.loss.ndim == 0 and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.action_logits.shape == (n_supervised, 32064) and out.action_logits.dtype == torch.float32
    assert out.action_targets.shape == (n_supervised,)
    assert out.logits is None and out.hidden_states is None
    out.loss.backward()
    assert vla.projector.fc1.weight.grad.abs().sum() > 0
    assert vla.language_model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert vla.vision_backbone.featurizer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert vla.vision_backbone.fused_featurizer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert vla.vision_backbone.featurizer.blocks[-1].attn.qkv.weight.grad is None  # never run


def test_loss_matches_float64_reference(model, batch):
    pixel_values, input_ids, attention_mask, labels = batch
    with torch.no_grad():
        out = model(pixel_values, input_ids, attention_mask, labels)
        full = model(pixel_values, input_ids, attention_mask).logits
    assert full.shape == (2, 14 + N_IMG, 32064)
    # Text token j >= 1 sits at sequence position j + 256 and is predicted from position j + 255.
    rows, targets = [], []
    for b in range(labels.shape[0]):
        for j in range(1, labels.shape[1]):
            if labels[b, j] != IGNORE_INDEX:
                rows.append(full[b, j + N_IMG - 1].double())
                targets.append(int(labels[b, j]))
    logits = torch.stack(rows)
    expected = -logits.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets)].mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)
    assert out.action_targets.tolist() == targets == labels[:, 1:][labels[:, 1:] != IGNORE_INDEX].tolist()
    torch.testing.assert_close(out.action_logits.double(), logits, rtol=1e-5, atol=1e-5)


def test_padding_is_masked(model, batch):
    pixel_values, input_ids, attention_mask, labels = batch
    with torch.no_grad():
        padded = model(pixel_values[1:], input_ids[1:], attention_mask[1:], labels[1:])
        unpadded = model(pixel_values[1:], input_ids[1:, :11], attention_mask[1:, :11], labels[1:, :11])
    torch.testing.assert_close(padded.loss, unpadded.loss)


def test_sequence_layout_and_hidden_states(model, batch):
    pixel_values, input_ids, attention_mask, _ = batch
    llm = model.language_model.model
    n = llm.config.num_hidden_layers
    captured = {}
    hooks = [
        llm.layers[n - 2].register_forward_hook(lambda m, a, o: captured.__setitem__("layer_n_minus_1", o)),
        llm.layers[n - 1].register_forward_hook(lambda m, a, o: captured.__setitem__("layer_n", o)),
        llm.norm.register_forward_hook(lambda m, a, o: captured.__setitem__("norm", o)),
    ]
    with torch.no_grad():
        out = model(pixel_values, input_ids, attention_mask, output_hidden_states=True)
        for h in hooks:
            h.remove()
        penultimate, last = model.hidden_states(pixel_values, input_ids, attention_mask, layers=(-2, -1))
        patches = model.projector(model.vision_backbone(pixel_values))
        text = llm.embed_tokens(input_ids)

    hs = out.hidden_states
    assert len(hs) == n + 1 and all(h.shape == (2, 14 + N_IMG, 64) for h in hs)
    assert model.image_token_slice == slice(1, 257) and model.num_image_tokens == N_IMG
    torch.testing.assert_close(hs[0][:, model.image_token_slice], patches, rtol=0, atol=0)
    torch.testing.assert_close(hs[0][:, 0], text[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(hs[0][:, 257:], text[:, 1:], rtol=0, atol=0)
    # [-2] is the raw output of decoder layer n-1; in transformers 5 (as in 4.40) [-1] is the final-norm output,
    # not the raw output of layer n.
    torch.testing.assert_close(penultimate, hs[-2], rtol=0, atol=0)
    torch.testing.assert_close(penultimate, captured["layer_n_minus_1"], rtol=0, atol=0)
    torch.testing.assert_close(hs[-1], captured["norm"], rtol=0, atol=0)
    torch.testing.assert_close(last, hs[-1], rtol=0, atol=0)
    assert not torch.allclose(hs[-1], captured["layer_n"])
    for bad in (n + 1, -(n + 2)):
        with pytest.raises(ValueError, match="layers must be in"):
            model.hidden_states(pixel_values, input_ids, attention_mask, layers=(-1, bad))


@pytest.mark.parametrize("context_fn", [None, lambda: (contextlib.nullcontext(), contextlib.nullcontext())])
def test_gradient_checkpointing_gives_same_loss_and_grads(batch, context_fn):
    torch.manual_seed(0)
    plain = OpenVLA.from_config(preset_config("tiny")).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    if context_fn is not None:  # switching to the wrapped units must not checkpoint twice
        ckpt.gradient_checkpointing_enable(context_fn=context_fn)
    builtin = [ckpt.language_model.model.layers[0].gradient_checkpointing,
               ckpt.vision_backbone.featurizer.grad_checkpointing,
               ckpt.vision_backbone.fused_featurizer.grad_checkpointing]
    assert builtin == [context_fn is None] * 3
    calls = []  # inner modules start again in the backward: the forward is recomputed there
    for unit in (ckpt.language_model.model.layers[0].mlp, ckpt.vision_backbone.featurizer.blocks[0].mlp,
                 ckpt.vision_backbone.fused_featurizer.blocks[0].mlp):
        unit.register_forward_pre_hook(lambda module, args: calls.append(module))
    losses = []
    for vla in (plain, ckpt):
        loss = vla(*batch).loss
        n_forward = len(calls)
        loss.backward()
        losses.append(loss)
    assert n_forward == 3 and len(calls) == 6
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(plain.projector.fc1.weight.grad, ckpt.projector.fc1.weight.grad)


def test_image_processor_constant_colour():
    processor = ImageProcessor(preset_config("tiny"))
    rgb = np.array([10, 128, 250], dtype=np.uint8)
    image = np.broadcast_to(rgb, (100, 150, 3)).copy()
    pixels = processor(image)
    assert pixels.shape == (6, 224, 224) and pixels.dtype == torch.float32
    scaled = rgb.astype(np.float64) / 255
    expected = np.concatenate([(scaled - DINO_MEAN) / DINO_STD, (scaled - 0.5) / 0.5])
    for c in range(6):
        torch.testing.assert_close(pixels[c], torch.full((224, 224), float(expected[c])), rtol=0, atol=1e-6)

    images = np.stack([image, 255 - image])
    batched = processor(images)
    assert batched.shape == (2, 6, 224, 224)
    torch.testing.assert_close(batched[0], pixels, rtol=0, atol=0)
    torch.testing.assert_close(processor([Image.fromarray(im) for im in images]), batched, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8"):
        processor(image.astype(np.float32))


def _torchvision_reference(image: Image.Image, strategy: str) -> torch.Tensor:
    """Upstream's transform chain spelled with torchvision: [letterbox pad], resize, center crop, to_tensor,
    normalise per backbone, DINO first."""
    import torchvision.transforms.functional as TVF
    from torchvision.transforms import InterpolationMode

    if strategy == "letterbox":
        w, h = image.size
        pad_x, pad_y = int((max(w, h) - w) / 2), int((max(w, h) - h) / 2)
        image = TVF.pad(image, [pad_x, pad_y, pad_x, pad_y], fill=(123, 116, 103), padding_mode="constant")
    size = 224 if strategy == "letterbox" else [224, 224]
    image = TVF.center_crop(TVF.resize(image, size, InterpolationMode.BICUBIC, antialias=True), 224)
    pixels = TVF.to_tensor(image)
    return torch.cat([TVF.normalize(pixels, DINO_MEAN, DINO_STD), TVF.normalize(pixels, SIGLIP_MEAN, SIGLIP_STD)])


@pytest.mark.parametrize("strategy", ["resize-naive", "letterbox"])
@pytest.mark.parametrize("shape", [(100, 150), (151, 90), (224, 224), (480, 640)])
def test_image_processor_matches_torchvision_chain(strategy, shape):
    config = preset_config("tiny")
    config.image_resize_strategy = strategy
    image = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    expected = _torchvision_reference(Image.fromarray(image), strategy)
    torch.testing.assert_close(ImageProcessor(config)(image), expected, rtol=0, atol=1e-6)


def test_letterbox_pads_with_the_dino_mean_colour():
    config = preset_config("tiny")
    config.image_resize_strategy = "letterbox"
    pixels = ImageProcessor(config)(np.full((50, 200, 3), 255, dtype=np.uint8))  # wide: bands top and bottom
    fill = (np.array([123, 116, 103]) / 255 - DINO_MEAN) / DINO_STD
    torch.testing.assert_close(pixels[:3, 0, 112], torch.tensor(fill, dtype=torch.float32), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[:3, 112, 112], (1 - torch.tensor(DINO_MEAN)) / torch.tensor(DINO_STD))
    config.image_resize_strategy = "resize-crop"
    with pytest.raises(ValueError, match="resize-naive.*letterbox"):
        ImageProcessor(config)


def test_tiny_tokenizer_ids_and_round_trip(tmp_path):
    tok = build_tiny_tokenizer()
    assert len(tok) == 32001
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 32000)
    assert tok.convert_tokens_to_ids(["▁", "<0x00>", "<0xFF>"]) == [29871, 3, 258]
    sentence = "In: What action should the robot take to pick up the red cup?\nOut:"
    ids = tok(sentence).input_ids
    assert ids[0] == 1 and ids[1] == 29871 and ids.count(1) == 1
    assert all(259 <= i <= 31743 or i in (13, 29871) for i in ids[1:])  # "\n" is the byte token <0x0A> = 13
    assert tok.decode(ids, skip_special_tokens=True) == sentence
    # Action ids decode to a string that tokenizes back to the same ids (the prompt builder relies on this).
    actions = [31744, 31872, 31999, 31800]
    prompt_ids = tok("Out: " + tok.decode(actions) + "</s>").input_ids
    assert prompt_ids[-len(actions) - 2 :] == [29871, *actions, 2]

    tok.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    assert reloaded(sentence).input_ids == ids and reloaded.pad_token_id == 32000 and len(reloaded) == 32001
    assert reloaded.padding_side == "right"


def test_sentencepiece_only_tokenizer_needs_sentencepiece(tmp_path):
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the tokenizer.model would be read")
    (tmp_path / "tokenizer.model").write_bytes(b"stand-in")
    with pytest.raises(ImportError, match="tokenizer.model but no tokenizer.json: install sentencepiece"):
        load_tokenizer(tmp_path)


def test_paused_checkpointing_keeps_activations_and_restores(batch):
    torch.manual_seed(0)
    plain = OpenVLA.from_config(preset_config("tiny")).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    starts = []
    ckpt.language_model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: starts.append(1))
    with ckpt.activation_checkpointing_paused():
        loss = ckpt(*batch).loss
    loss.backward()
    assert len(starts) == 1  # no recomputation in the backward
    plain(*batch).loss.backward()
    torch.testing.assert_close(plain.projector.fc1.weight.grad, ckpt.projector.fc1.weight.grad)
    assert ckpt.language_model.model.layers[0].gradient_checkpointing
    assert ckpt.vision_backbone.featurizer.grad_checkpointing and ckpt.vision_backbone.fused_featurizer.grad_checkpointing
    ckpt(*batch).loss.backward()
    assert len(starts) == 3  # checkpointing is back: forward and recomputation
