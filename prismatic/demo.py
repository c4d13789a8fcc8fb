"""The demo assets: a synthetic LIBERO-90 RLDS dataset, a tiny random OpenVLA checkpoint, its anchor cache
(with held-out anchors from other episodes).

Existing assets are kept (`force=True` rebuilds them).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from prismatic.models import OpenVLA, build_tiny_tokenizer, preset_config, save_pretrained
from prismatic.training.anchor_builder import AnchorCacheConfig, build_anchor_cache
from prismatic.vla.datasets import write_synthetic_libero

DATASET = "libero_90_no_noops"


@dataclass
class DemoAssetsConfig:
    out: Path = Path("data/demo")
    num_tasks: int = 4
    episodes_per_task: int = 6
    steps_per_episode: int = 25
    num_anchors: int = 64
    num_heldout_anchors: int = 8
    dtype: str = "bfloat16"  # the compute dtype of the demo run (mixed precision on, as by default)
    seed: int = 0
    force: bool = False


def make_demo_assets(cfg: DemoAssetsConfig) -> None:
    rlds, model_dir, cache = cfg.out / "rlds", cfg.out / "model", cfg.out / "anchor_cache"
    if cfg.force:
        for path in (rlds, model_dir, cache):
            shutil.rmtree(path, ignore_errors=True)

    if (rlds / DATASET).exists():
        print(f"keeping {rlds / DATASET}")
    else:
        write_synthetic_libero(rlds, name=DATASET, num_tasks=cfg.num_tasks, episodes_per_task=cfg.episodes_per_task,
                               steps_per_episode=cfg.steps_per_episode, seed=cfg.seed)
        print(f"wrote synthetic LIBERO-90 RLDS data to {rlds / DATASET}")

    if (model_dir / "config.json").exists():
        print(f"keeping {model_dir}")
    else:
        torch.manual_seed(cfg.seed)
        save_pretrained(OpenVLA.from_config(preset_config("tiny")), model_dir, tokenizer=build_tiny_tokenizer())
        print(f"wrote a tiny randomly initialised OpenVLA checkpoint to {model_dir}")

    if (cache / "meta.json").exists():
        print(f"keeping {cache}")
    else:
        cache_cfg = AnchorCacheConfig(pretrained_checkpoint=model_dir, data_root_dir=rlds, data_mix="libero_90",
                                      output_dir=cache, num_anchors=cfg.num_anchors,
                                      num_heldout_anchors=cfg.num_heldout_anchors, dtype=cfg.dtype,
                                      device="cpu", seed=cfg.seed, shuffle_buffer_size=1000)
        cache_cfg.validate()
        build_anchor_cache(cache_cfg)
