"""Fine-tune OpenVLA with CRaFT (or plain behaviour cloning with --craft.enabled false).

    torchrun --standalone --nnodes 1 --nproc-per-node 1 vla-scripts/train_craft.py \
      --pretrained_checkpoint <OPENVLA_CKPT> --data_root_dir <RLDS_ROOT> --vla.data_mix libero_90 \
      --craft.anchor_cache_dir <ANCHOR_CACHE_DIR> --dry_run_batches 3
"""

import sys

import draccus

from prismatic.conf.train import TrainConfig
from prismatic.training.preflight import PreflightError
from prismatic.training.trainer import train


@draccus.wrap()
def main(cfg: TrainConfig) -> None:
    try:
        train(cfg)
    except PreflightError as e:
        print(f"train_craft.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
