"""Checkpoints: HF layout on disk, sharding, exact reload, safe overwrite, clear errors."""

import json
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open

import prismatic.models  # noqa: F401  (installs the torchvision import guard before timm/transformers)
from prismatic.models import (
    OpenVLA,
    build_tiny_tokenizer,
    load_dataset_statistics,
    load_pretrained,
    preset_config,
    save_pretrained,
)
from prismatic.models import checkpoint
from prismatic.models.checkpoint import to_disk_name

CONFIG_KEYS = {
    "model_type", "vision_backbone_id", "llm_backbone_id", "arch_specifier", "use_fused_vision_backbone",
    "image_resize_strategy", "timm_model_ids", "timm_override_act_layers", "image_sizes", "hf_llm_id",
    "llm_max_length", "pad_token_id", "pad_to_multiple_of", "output_projector_states", "n_action_bins", "norm_stats",
    "torch_dtype", "text_config", "auto_map", "architectures", "transformers_version",
}  # fmt: skip
STATS = {"libero_spatial": {"action": {"q01": np.array([-0.5] * 7), "q99": [0.5] * 7, "mask": [True] * 6 + [False]}}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vla = OpenVLA.from_config(preset_config("tiny")).eval()
    with torch.no_grad():  # make LayerScale distinguishable from its init value
        vla.vision_backbone.featurizer.blocks[0].ls1.gamma.uniform_(0.5, 1.5)
    return vla


def _inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 31000, (2, 9), generator=g)
    ids[:, 0] = 1
    return torch.randn(2, 6, 224, 224, generator=g), ids, torch.ones(2, 9, dtype=torch.bool)


def _disk_keys(folder):
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as reader:
            keys.update(reader.keys())
    return keys


def test_sharded_round_trip(model, tmp_path):
    out = save_pretrained(model, tmp_path / "ckpt", build_tiny_tokenizer(), STATS, max_shard_size_bytes=5 * 2**20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in model.state_dict().values())

    keys = _disk_keys(out)
    assert keys == set(index["weight_map"]) == {to_disk_name(k) for k in model.state_dict()}
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert not any("gamma" in k for k in keys)

    config = json.loads((out / "config.json").read_text())
    assert set(config) == CONFIG_KEYS
    assert config["text_config"]["vocab_size"] == 32064 and config["text_config"]["pad_token_id"] == 32000
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["OpenVLAForActionPrediction"]
    assert config["auto_map"]["AutoModelForVision2Seq"] == "modeling_prismatic.OpenVLAForActionPrediction"
    assert config["norm_stats"]["libero_spatial"]["action"]["q01"] == [-0.5] * 7
    assert load_dataset_statistics(out) == config["norm_stats"]

    loaded, tokenizer, loaded_config = load_pretrained(out)
    assert loaded_config.norm_stats == config["norm_stats"] and not loaded.training
    assert tokenizer.pad_token_id == 32000 and len(tokenizer) == 32001
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()).logits, model(*_inputs()).logits, rtol=0, atol=0)


def test_bfloat16_single_file(model, tmp_path):
    out = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, tokenizer, _ = load_pretrained(out, dtype=torch.float32)
    assert tokenizer is None
    w = model.projector.fc1.weight
    assert loaded.projector.fc1.weight.dtype == torch.float32
    assert torch.equal(loaded.projector.fc1.weight, w.to(torch.bfloat16).float())


def test_refuses_to_overwrite_and_leaves_no_partial_folder(model, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()  # an existing empty folder is fine
    save_pretrained(model, out)
    (out / "stray.txt").write_text("old run")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, out)
    assert (out / "stray.txt").exists()
    save_pretrained(model, out, overwrite=True)
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").exists()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path / "interrupted", BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half folder, no temp folder


def test_clear_errors_on_missing_or_mismatched_files(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty")

    out = save_pretrained(model, tmp_path / "sharded", max_shard_size_bytes=5 * 2**20)
    last_shard = sorted(out.glob("model-*.safetensors"))[-1]
    last_shard.unlink()
    with pytest.raises(FileNotFoundError, match=last_shard.name):
        load_pretrained(out)
    (out / "model.safetensors.index.json").unlink()
    for f in out.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(out)

    # A config asking for fewer LLM layers than the weights hold: strict key check names the extra keys.
    out = save_pretrained(model, tmp_path / "mismatch")
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"0 missing.*unexpected.*language_model\.model\.layers\.3\."):
        load_pretrained(out)


class _RecordingReader:
    """Wraps safetensors' reader, keeping weak references to every tensor it hands out."""

    def __init__(self, log, path, **kwargs):
        self._reader = log.real(path, **kwargs)
        log.live_at_open.append(log.live())
        self._log = log

    def __enter__(self):
        self._reader.__enter__()
        return self

    def __exit__(self, *exc):
        return self._reader.__exit__(*exc)

    def keys(self):
        return self._reader.keys()

    def get_tensor(self, key):
        self._log.live_at_read.append(self._log.live())
        tensor = self._reader.get_tensor(key)
        self._log.refs.append(weakref.ref(tensor))
        self._log.storages.add(tensor.untyped_storage().data_ptr())
        return tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_streams_without_a_second_copy(model, tmp_path, monkeypatch, dtype):
    """bf16 on disk: a float32 load frees each stored tensor once cast (at most the previous one is alive when the
    next is read, none when a shard opens or at the end); a bf16 load makes the stored tensors the parameters."""
    out = save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size_bytes=2**20)

    class log:
        real, refs, storages, live_at_open, live_at_read = checkpoint.safe_open, [], set(), [], []

        @classmethod
        def live(cls):
            return sum(ref() is not None for ref in cls.refs)

    monkeypatch.setattr(checkpoint, "safe_open", lambda path, **kw: _RecordingReader(log, path, **kw))
    loaded, _, _ = load_pretrained(out, dtype=dtype)
    n_shards = len(list(out.glob("model-*.safetensors")))
    assert n_shards > 2 and len(log.live_at_open) == 2 * n_shards  # key check, then the load
    if dtype == torch.float32:
        assert log.live_at_open == [0] * len(log.live_at_open) and max(log.live_at_read) == 1
        assert all(ref() is None for ref in log.refs)
    else:
        assert {p.untyped_storage().data_ptr() for p in loaded.parameters()} <= log.storages
    assert all(p.dtype == dtype for p in loaded.parameters())


def test_explicit_state_dict_replaces_the_models(model, tmp_path):
    gathered = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    loaded, _, _ = load_pretrained(save_pretrained(model, tmp_path / "ckpt", state_dict=gathered))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gathered.items())
