"""One evaluation of a perturbed demo model: run by torchrun from test_evaluation.py (FSDP2-sharded over the
processes when there are several) and imported by it for the single-process reference.

    eval_worker.py DEMO_DIR OUT_DIR    writes OUT_DIR/rank<r>.json, this process's eval row
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import prismatic.models  # noqa: F401  (torchvision guard before timm)
from craft.anchor_cache import AnchorCache
from prismatic.models import ImageProcessor, load_pretrained
from prismatic.training.distributed import dist_env_from_environ, init_process_group, shard_model
from prismatic.training.evaluation import Evaluator, FrameSet, anchor_sets
from prismatic.models.action_tokenizer import ActionTokenizer
from prismatic.models.batching import PaddedCollator

# Uneven on purpose: 8 held-out anchors and 16 training ones in batches of 3, 3 validation batches over 2 ranks.
BATCH_SIZE, VAL_BATCHES, EPSILON = 3, 3, 1e-4


def perturbed_model(demo: Path):
    """The demo checkpoint with its LLM layers moved by seeded noise, so every drift is non-zero."""
    model, tokenizer, config = load_pretrained(demo / "model")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.language_model.model.layers.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model, tokenizer, config


def synthetic_frames(n: int) -> list:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
             "action": rng.uniform(-1, 1, 7).astype(np.float32), "instruction": f"put object {i % 3} in the basket"}
            for i in range(n)]


def evaluator(model, tokenizer, config, demo: Path, rank: int = 0, world_size: int = 1, autocast=None,
              cache_dir: Path = None) -> Evaluator:
    sets, _ = anchor_sets(AnchorCache.open(cache_dir or demo / "anchor_cache"), train_subset=16)
    frames = FrameSet("val", lambda: synthetic_frames(VAL_BATCHES * BATCH_SIZE), VAL_BATCHES * BATCH_SIZE)
    extra = {"autocast": autocast} if autocast is not None else {}
    return Evaluator(model, anchor_sets=sets, frame_sets=[frames], loss_type="mse", processor=ImageProcessor(config),
                     tokenizer=tokenizer, action_tokenizer=ActionTokenizer(n_bins=config.n_action_bins),
                     collator=PaddedCollator(tokenizer.pad_token_id, config.llm_max_length), batch_size=BATCH_SIZE,
                     device=torch.device("cpu"), rank=rank, world_size=world_size, **extra)


def main(demo: Path, out: Path) -> None:
    env = dist_env_from_environ()
    device = torch.device("cpu")
    init_process_group(env, device, timeout_s=300)
    model, tokenizer, config = perturbed_model(demo)
    model.train()
    if env.distributed:
        shard_model(model, env, device, "full-shard", mixed_precision=False)
    row = evaluator(model, tokenizer, config, demo, env.rank, env.world_size)(step=5, epsilon=EPSILON)
    row["training_after"] = model.training
    (out / f"rank{env.rank}.json").write_text(json.dumps(row))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
