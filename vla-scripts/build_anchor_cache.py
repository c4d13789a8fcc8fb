"""Build CRaFT's anchor cache from the pretrained checkpoint, before fine-tuning.

    python vla-scripts/build_anchor_cache.py --pretrained_checkpoint <OPENVLA_CKPT> \
      --data_root_dir <RLDS_ROOT> --data_mix libero_90 --output_dir <ANCHOR_CACHE_DIR> \
      --num_anchors 512 --hidden_layer -2 --pooling mean_image_tokens --dtype bfloat16

--retention_mode action caches the pretrained model's action-bin distributions at each anchor's recorded action tokens
instead of hidden features; --hidden_layers '[-1,-2]' caches several layers at once. Every cache also stores the
anchors' recorded actions (for --craft.retention_mode action and --vla.replay_batch_size).

Also writes <ANCHOR_CACHE_DIR>/heldout/: `--num_heldout_anchors` (default 10% of --num_anchors; 0 = none) anchors
from episodes disjoint from the training anchors' episodes, which training never draws and evaluation measures.
"""

import sys

import draccus

from prismatic.training.anchor_builder import AnchorCacheConfig, build_anchor_cache


@draccus.wrap()
def main(cfg: AnchorCacheConfig) -> None:
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"build_anchor_cache.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    build_anchor_cache(cfg)


if __name__ == "__main__":
    main()
