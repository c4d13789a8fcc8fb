"""Fine-tune OpenVLA with CRaFT (or plain behaviour cloning with --craft.enabled false).

    torchrun --standalone --nnodes 1 --nproc-per-node 1 vla-scripts/train_craft.py \
      --pretrained_checkpoint <OPENVLA_CKPT> --data_root_dir <RLDS_ROOT> --vla.data_mix libero_90 \
      --craft.anchor_cache_dir <ANCHOR_CACHE_DIR> --dry_run_batches 3
"""

import json
import os
import sys
import time

from prismatic.conf.cli import FlagError, parse_flags
from prismatic.conf.train import TrainConfig
from prismatic.training.checkpointing import CheckpointSpaceError
from prismatic.training.preflight import PreflightError
from prismatic.training.trainer import train


def fail(message: str) -> None:
    """Print the error and exit 2. Under torchrun, also hand it to the launcher's error file: torchrun
    then ends its failure report with this line instead of a pointer to its documentation."""
    line = f"train_craft.py: error: {message}"
    print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    sys.exit(2)


def main() -> None:
    try:
        cfg = parse_flags(TrainConfig, sys.argv[1:])
    except FlagError as e:
        fail(str(e))
    try:
        train(cfg)
    except PreflightError as e:
        fail(str(e))
    except CheckpointSpaceError as e:
        fail(e.strerror)


if __name__ == "__main__":
    main()
