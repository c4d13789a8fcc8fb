"""Model configuration, field for field the Hugging Face `config.json` of openvla/openvla-7b.

Keeping the exact field names lets a real `config.json` be read, and ours be read by Hugging Face code.
`architectures` and `auto_map` name OpenVLA's remote-code classes, which is how HF tooling recognises the
folder. Keys we do not model are kept in `extra` and written back unchanged, so a real file round-trips; only
`transformers_version` is rewritten on save, to the installed version, as Hugging Face does.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

CONFIG_NAME = "config.json"
STATS_NAME = "dataset_statistics.json"
PATCH_SIZE = 14  # both DINOv2 ViT-L/14 and SigLIP So400m/14 use 14x14 patches


@dataclass
class VLAModelConfig:
    vision_backbone_id: str
    llm_backbone_id: str
    timm_model_ids: list[str]
    # LlamaConfig fields. It may list only non-default fields (transformers writes nested configs as a diff):
    # whatever is missing takes LlamaConfig's defaults, see `llama_config()`.
    text_config: dict[str, Any]
    model_type: str = "openvla"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool = True
    image_resize_strategy: str = "resize-naive"
    timm_override_act_layers: list[str | None] = field(default_factory=lambda: [None, None])
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    hf_llm_id: str | None = None
    llm_max_length: int = 2048
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    output_projector_states: bool = False
    n_action_bins: int = 256
    # {dataset: {"action": {"q01", "q99", "mask", ...}, ...}}; load_pretrained prefers dataset_statistics.json.
    norm_stats: dict[str, Any] | None = None
    torch_dtype: str = "float32"
    architectures: list[str] = field(default_factory=lambda: ["OpenVLAForActionPrediction"])
    auto_map: dict[str, str] = field(
        default_factory=lambda: {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        }
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content: our fields, then the unknown keys read in, unchanged."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLAModelConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        d = copy.deepcopy(d)
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(**self.text_config)

    @property
    def hidden_size(self) -> int:
        return self.llama_config().hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.llama_config().num_hidden_layers

    @property
    def base_vocab_size(self) -> int:
        """Text vocabulary without <PAD> and the padding rows (32000): where the action ids end."""
        return self.llama_config().vocab_size - self.pad_to_multiple_of

    @property
    def num_image_tokens(self) -> int:
        return (self.image_sizes[0] // PATCH_SIZE) ** 2


# Llama-2-7B with OpenVLA's vocabulary (32000 + <PAD>, padded to a multiple of 64 = 32064). rms_norm_eps 1e-5 and
# max_position_embeddings 4096 are Llama-2's own values, which the LLM was trained with. The published HF export
# instead leaves LlamaConfig's defaults there (1e-6, 2048); a config.json read from disk keeps whatever it says.
_LLAMA2_7B = dict(
    model_type="llama",
    vocab_size=32064,
    pad_token_id=32000,
    bos_token_id=1,
    eos_token_id=2,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

PRESETS: dict[str, VLAModelConfig] = {
    "openvla-7b": VLAModelConfig(
        vision_backbone_id="dinosiglip-vit-so-224px",
        llm_backbone_id="llama2-7b-pure",
        hf_llm_id="meta-llama/Llama-2-7b-hf",
        timm_model_ids=["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        text_config=_LLAMA2_7B,
        torch_dtype="bfloat16",
    ),
    # Same structure and token ids, tiny widths: for tests and CPU smoke runs. The timm ids name the tiny ViTs
    # defined in `prismatic.models.vision`.
    "tiny": VLAModelConfig(
        vision_backbone_id="tiny-dinosiglip-224px",
        llm_backbone_id="tiny-llama",
        timm_model_ids=["tiny_vit_dinov2_reg4", "tiny_vit_siglip"],
        text_config={
            **_LLAMA2_7B,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
        },
        torch_dtype="float32",
    ),
}


def preset_config(name: str) -> VLAModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def read_config(path: str | Path) -> VLAModelConfig:
    """The config of a checkpoint folder; its `norm_stats` are replaced by dataset_statistics.json when the folder
    has one (a fine-tuned checkpoint's own statistics), as OpenVLA's evaluation scripts do."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected an OpenVLA checkpoint folder with {CONFIG_NAME}")
    config = VLAModelConfig.from_dict(json.loads(config_path.read_text()))
    if (folder / STATS_NAME).is_file():
        config.norm_stats = load_dataset_statistics(folder)
    return config


def load_dataset_statistics(path: str | Path) -> dict:
    """`dataset_statistics.json` of a checkpoint folder (or the file itself): the action/proprio norm stats."""
    path = Path(path)
    stats_path = path / STATS_NAME if path.is_dir() else path
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} not found")
    return json.loads(stats_path.read_text())
