"""A checkpoint folder laid out exactly like openvla/openvla-7b (written here by hand, not by save_pretrained)
loads, trains one step, saves in the same layout and reloads to identical logits."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import prismatic.models  # noqa: F401  (installs the torchvision import guard before timm/transformers)
from prismatic.models import (
    ImageProcessor,
    OpenVLA,
    VLAModelConfig,
    build_tiny_tokenizer,
    load_pretrained,
    save_pretrained,
)
from prismatic.models.checkpoint import CheckpointFileError, check_weight_files
from prismatic.models.processor import DINO_MEAN, DINO_STD
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator, training_example

NORM_STATS = {
    "bridge_orig": {
        "action": {
            "mask": [True] * 6 + [False],
            "q01": [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0],
            "q99": [0.03, 0.04, 0.03, 0.1, 0.1, 0.2, 1.0],
            "mean": [0.0] * 7,
            "std": [0.01] * 7,
        },
        "num_trajectories": 60064,
        "num_transitions": 2135463,
    },
    "fractal20220817_data": {
        "action": {"mask": [True] * 6 + [False], "q01": [-0.2] * 7, "q99": [0.2] * 6 + [1.0]},
    },
}
# The openvla-7b config.json keys (facts §9); text_config is the partial diff transformers 4.40 writes, plus the
# widths of the tiny test LLM (the real file relies on LlamaConfig's defaults for those).
CONFIG = {
    "arch_specifier": "no-align+fused-gelu-mlp",
    "architectures": ["OpenVLAForActionPrediction"],
    "auto_map": {
        "AutoConfig": "configuration_prismatic.OpenVLAConfig",
        "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
    },
    "hf_llm_id": "meta-llama/Llama-2-7b-hf",
    "image_resize_strategy": "resize-naive",
    "image_sizes": [224, 224],
    "llm_backbone_id": "llama2-7b-pure",
    "llm_max_length": 2048,
    "model_type": "openvla",
    "n_action_bins": 256,
    "norm_stats": NORM_STATS,
    "output_projector_states": False,
    "pad_to_multiple_of": 64,
    "pad_token_id": 32000,
    "text_config": {
        "model_type": "llama",
        "pad_token_id": 32000,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
    "timm_model_ids": ["tiny_vit_dinov2_reg4", "tiny_vit_siglip"],
    "timm_override_act_layers": [None, None],
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_fused_vision_backbone": True,
    "vision_backbone_id": "dinosiglip-vit-so-224px",
}
# openvla-7b's preprocessor_config.json. Upstream's processor applies `tvf_normalize_params`, whose DINO entry
# holds the bfloat16-rounded ImageNet statistics; `means`/`stds` keep the float32 values and are not applied.
BF16_DINO_MEAN = [0.484375, 0.455078125, 0.40625]
BF16_DINO_STD = [0.228515625, 0.2236328125, 0.224609375]
_RESIZE = {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}
RELEASED_PREPROCESSOR = {
    "auto_map": {
        "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
        "AutoProcessor": "processing_prismatic.PrismaticProcessor",
    },
    "image_processor_type": "PrismaticImageProcessor",
    "image_resize_strategy": "resize-naive",
    "input_sizes": [[3, 224, 224], [3, 224, 224]],
    "interpolations": ["bicubic", "bicubic"],
    "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
    "processor_class": "PrismaticProcessor",
    "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
    "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
    "tvf_do_letterbox": False,
    "tvf_letterbox_fill": None,
    "tvf_normalize_params": [
        {"inplace": False, "mean": BF16_DINO_MEAN, "std": BF16_DINO_STD},
        {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    ],
    "tvf_resize_params": [_RESIZE, _RESIZE],
    "use_fused_vision_backbone": True,
}
# Names as in the published index (LayerScale as `scale_factor`, projector fc1..fc3, Llama under language_model).
SAMPLE_WEIGHT_NAMES = {
    "vision_backbone.featurizer.cls_token",
    "vision_backbone.featurizer.reg_token",
    "vision_backbone.featurizer.pos_embed",
    "vision_backbone.featurizer.patch_embed.proj.weight",
    "vision_backbone.featurizer.blocks.0.ls1.scale_factor",
    "vision_backbone.featurizer.blocks.0.ls2.scale_factor",
    "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
    "vision_backbone.featurizer.norm.weight",
    "vision_backbone.fused_featurizer.attn_pool.latent",
    "vision_backbone.fused_featurizer.blocks.0.mlp.fc1.weight",
    "projector.fc1.weight",
    "projector.fc2.bias",
    "projector.fc3.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.1.mlp.down_proj.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
}
REMOTE_CODE = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _write_tokenizer_files(folder):
    """tokenizer.json (the offline tiny stand-in) + the Llama-2 side files of the published folder."""
    build_tiny_tokenizer().save_pretrained(str(folder))  # tokenizer.json, tokenizer_config.json (replaced below)
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {i: {**special, "content": t, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    added[32000] = {**special, "content": "<PAD>", "special": True}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): v for i, v in added.items()},
        "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": "<PAD>",
        "padding_side": "right",
        "processor_class": "PrismaticProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    special_map = {k: {**special, "content": v} for k, v in [("bos_token", "<s>"), ("eos_token", "</s>")]}
    special_map.update(pad_token="<PAD>", unk_token={**special, "content": "<unk>"})
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({"<PAD>": 32000}))
    # No sentencepiece offline: a stand-in that is never parsed, since tokenizer.json takes precedence.
    (folder / "tokenizer.model").write_bytes(b"sentencepiece model stand-in")


def _write_openvla_folder(folder) -> dict[str, torch.Tensor]:
    """The published file set; returns the stored tensors by on-disk name."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True))
    torch.manual_seed(0)
    model = OpenVLA.from_config(VLAModelConfig.from_dict(CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.uniform_(0.5, 1.5)  # distinguishable from LayerScale's init value
    tensors = {re.sub(r"\.gamma$", ".scale_factor", k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}

    names = list(tensors)
    cuts = [0, names.index("language_model.model.embed_tokens.weight"), names.index("language_model.lm_head.weight")]
    groups = [names[a:b] for a, b in zip(cuts, cuts[1:] + [len(names)])]
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    _write_tokenizer_files(folder)
    for name in REMOTE_CODE:
        (folder / name).write_text(f'raise RuntimeError("{name} must never be imported")\n')
    (folder / "preprocessor_config.json").write_text(json.dumps(RELEASED_PREPROCESSOR, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return tensors


def _disk_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as reader:
            assert reader.metadata() == {"format": "pt"}
            out.update({k: reader.get_tensor(k) for k in reader.keys()})
    return out


def _batch(tokenizer, config):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 96, 128, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, size=(2, 7))
    examples = [
        training_example(tokenizer, ActionTokenizer(), text, a)
        for text, a in zip(["pick up the spoon", "close the top drawer of the cabinet"], actions)
    ]
    batch = PaddedCollator(tokenizer.pad_token_id)([e[0] for e in examples], [e[1] for e in examples])
    return ImageProcessor(config)(images), batch["input_ids"], batch["attention_mask"], batch["labels"]


def _pattern(folder) -> set[str]:
    return {SHARD.sub("model-N-of-M.safetensors", p.name) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "openvla-7b"
    return folder, _write_openvla_folder(folder)


def test_load_train_save_reload(published, tmp_path):
    folder, stored = published
    assert SAMPLE_WEIGHT_NAMES <= set(stored)
    model, tokenizer, config = load_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert config.norm_stats == NORM_STATS  # from config.json: the folder has no dataset_statistics.json
    assert (config.hidden_size, config.llama_config().rms_norm_eps) == (64, 1e-6)  # LlamaConfig defaults filled in
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (1, 32000, 32001)
    gamma = model.vision_backbone.featurizer.blocks[0].ls1.gamma
    assert torch.equal(gamma, stored["vision_backbone.featurizer.blocks.0.ls1.scale_factor"])
    assert torch.equal(model.language_model.lm_head.weight, stored["language_model.lm_head.weight"])

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pixel_values, input_ids, attention_mask, labels = _batch(tokenizer, config)
    model(pixel_values, input_ids, attention_mask, labels).loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.equal(gamma, stored["vision_backbone.featurizer.blocks.0.ls1.scale_factor"])
    assert not torch.equal(model.projector.fc1.weight, stored["projector.fc1.weight"])

    new_stats = {"libero_spatial_no_noops": {"action": {"q01": [-0.9] * 7, "q99": [0.9] * 7, "mask": [True] * 7}}}
    out = save_pretrained(
        model, tmp_path / "finetuned", tokenizer, new_stats, max_shard_size_bytes=4 * 2**20, source_dir=folder
    )

    # Same file pattern (plus the new statistics file), same weight names, dtypes and shard metadata.
    assert _pattern(out) == _pattern(folder) | {"dataset_statistics.json"}
    assert len(list(out.glob("model-*.safetensors"))) > 1
    saved = _disk_tensors(out)
    assert set(saved) == set(stored) and all(t.dtype == torch.bfloat16 for t in saved.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(saved)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    for name in (*REMOTE_CODE, "preprocessor_config.json", "generation_config.json", "tokenizer.model"):
        digest = [hashlib.sha256((f / name).read_bytes()).hexdigest() for f in (folder, out)]
        assert digest[0] == digest[1], name

    config_in, config_out = (json.loads((f / "config.json").read_text()) for f in (folder, out))
    assert set(config_out) == set(config_in)
    assert config_out["text_config"] == config_in["text_config"]  # the partial diff is kept as is
    assert config_out["norm_stats"] == new_stats == json.loads((out / "dataset_statistics.json").read_text())
    # Like Hugging Face's save_pretrained: the writing transformers' version, not the one read in.
    assert config_out["transformers_version"] == transformers.__version__
    rewritten = ("norm_stats", "transformers_version")
    assert {k: v for k, v in config_out.items() if k not in rewritten} == {
        k: v for k, v in config_in.items() if k not in rewritten
    }

    reloaded, reloaded_tokenizer, reloaded_config = load_pretrained(out, dtype=torch.bfloat16)
    assert reloaded_config.norm_stats == new_stats
    assert reloaded_tokenizer(["pick up the spoon"]).input_ids == tokenizer(["pick up the spoon"]).input_ids
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    with torch.no_grad():
        expected = model(pixel_values, input_ids, attention_mask).logits
        assert torch.equal(reloaded(pixel_values, input_ids, attention_mask).logits, expected)


def test_float32_load_of_bfloat16_folder(published):
    folder, stored = published
    model, _, _ = load_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.projector.fc1.weight, stored["projector.fc1.weight"].float())


def test_released_preprocessor_applies_bfloat16_dino_statistics(published):
    """The bfloat16-rounded numbers are what upstream applies: pixels match a float64 computation with them, and
    differ from the float32 statistics' by up to ~0.008 in the DINO channels only."""
    folder, _ = published
    assert BF16_DINO_MEAN == torch.tensor(DINO_MEAN).to(torch.bfloat16).tolist()  # the fact, independently
    assert BF16_DINO_STD == torch.tensor(DINO_STD).to(torch.bfloat16).tolist()
    model, _, config = load_pretrained(folder)
    processor = model.image_processor
    assert processor.means == [BF16_DINO_MEAN, [0.5] * 3] and processor.stds == [BF16_DINO_STD, [0.5] * 3]
    assert ImageProcessor.from_pretrained(folder).means == processor.means  # config.json read when not given

    image = np.random.default_rng(1).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    scaled = image.transpose(2, 0, 1).astype(np.float64) / 255
    mean = np.array(BF16_DINO_MEAN + [0.5] * 3)[:, None, None]
    std = np.array(BF16_DINO_STD + [0.5] * 3)[:, None, None]
    expected = (np.concatenate([scaled, scaled]) - mean) / std
    pixels = processor(image)
    np.testing.assert_allclose(pixels.numpy(), expected, rtol=0, atol=2e-6)
    gap = (pixels - ImageProcessor(config)(image)).abs().amax(dim=(1, 2))
    assert 0.005 < gap[:3].max() < 0.009 and gap[3:].max() == 0


def _tensors(processor):
    images = np.random.default_rng(2).integers(0, 256, size=(2, 60, 90, 3), dtype=np.uint8)
    return processor(images)


@pytest.mark.parametrize("strategy", ["resize-naive", "letterbox"])
def test_written_preprocessor_config_round_trips(tmp_path, strategy):
    config = VLAModelConfig.from_dict({**CONFIG, "image_resize_strategy": strategy})
    model = OpenVLA.from_config(config)
    default = save_pretrained(model, tmp_path / "default")
    loaded = ImageProcessor.from_pretrained(default, config)
    assert loaded.means == [list(DINO_MEAN), [0.5] * 3] and loaded.to_dict() == model.image_processor.to_dict()
    assert torch.equal(_tensors(loaded), _tensors(ImageProcessor(config)))

    bf16 = ImageProcessor(config, means=[BF16_DINO_MEAN, [0.5] * 3], stds=[BF16_DINO_STD, [0.5] * 3])
    out = save_pretrained(model, tmp_path / "bf16", processor=bf16)
    written = json.loads((out / "preprocessor_config.json").read_text())
    assert written["tvf_normalize_params"][0] == {"inplace": False, "mean": BF16_DINO_MEAN, "std": BF16_DINO_STD}
    assert written["tvf_do_letterbox"] == (strategy == "letterbox")
    reloaded, _, _ = load_pretrained(out)
    assert reloaded.image_processor.to_dict() == bf16.to_dict()
    assert torch.equal(_tensors(reloaded.image_processor), _tensors(bf16))
    if strategy == "resize-naive":  # the released file's layout, key for key
        assert set(written) == set(RELEASED_PREPROCESSOR)
        assert {k: v for k, v in written.items() if k not in ("means", "stds", "tvf_normalize_params")} == {
            k: v for k, v in RELEASED_PREPROCESSOR.items() if k not in ("means", "stds", "tvf_normalize_params")
        }


def test_bad_preprocessor_config_names_the_file(tmp_path):
    config = VLAModelConfig.from_dict(CONFIG)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "PrismaticImageProcessor"}))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json is not an OpenVLA image processor config.*"
                                         r"tvf_normalize_params"):
        ImageProcessor.from_pretrained(tmp_path, config)
    letterbox = {**RELEASED_PREPROCESSOR, "image_resize_strategy": "letterbox"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(letterbox))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json \(image_resize_strategy 'letterbox'.*"
                                         r"disagrees with the model config \(image_resize_strategy 'resize-naive'"):
        ImageProcessor.from_pretrained(tmp_path, config)
    one_backbone = {**RELEASED_PREPROCESSOR, "tvf_normalize_params": RELEASED_PREPROCESSOR["tvf_normalize_params"][:1]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(one_backbone))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: tvf_normalize_params: expected 3 means"):
        ImageProcessor.from_pretrained(tmp_path, config)


def _header_and_data_bytes(path):
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return header_len, len(raw) - 8 - header_len


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_truncated_shard_is_one_clear_error_before_loading(published, tmp_path, monkeypatch, cut):
    folder, _ = published
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    shard = damaged / "model-00002-of-00003.safetensors"
    header_len, data_bytes = _header_and_data_bytes(shard)
    keep = {"data": 8 + header_len + data_bytes - 1000, "header": 8 + header_len // 2, "length": 5}[cut]
    shard.write_bytes(shard.read_bytes()[:keep])
    expected = {
        "data": f"expected {data_bytes} bytes of tensor data per its header, found {data_bytes - 1000}",
        "header": f"its safetensors header announces {header_len} bytes of header, but only {header_len // 2} bytes follow",
        "length": "5 bytes, shorter than the 8-byte safetensors header length",
    }[cut]

    def never(*args, **kwargs):
        raise AssertionError("tensors were read from a damaged checkpoint")

    monkeypatch.setattr("prismatic.models.checkpoint._read_shard", never)
    with pytest.raises(CheckpointFileError) as info:
        load_pretrained(damaged)
    assert isinstance(info.value, ValueError)  # the entry scripts print ValueErrors as one line
    assert str(info.value) == f"{shard} is damaged or truncated: {expected}"
    with pytest.raises(CheckpointFileError, match=re.escape(expected)):
        check_weight_files(damaged)  # the same check alone, for a preflight
