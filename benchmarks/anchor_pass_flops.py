"""Model FLOPs of one anchor's forward + backward, fed the whole prompt or (as the anchor pass does when pooling
over image tokens) BOS and the image only: what the shorter pass saves, counted for any preset without a GPU.

The model is built on the meta device, so a 7B count needs no memory and runs on any machine. transformers probes
the positions for packed sequences with a value read (`.item()`) that meta tensors cannot give; the probe is
switched off for the count (positions are plain 0..n-1 here, as in training).

    python benchmarks/anchor_pass_flops.py --preset openvla-7b --text_lengths 20 30 100 --out OUT.json
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_record, run_cli  # noqa: E402
from flops import counted_flops  # noqa: E402

import prismatic.models  # noqa: E402,F401  (torchvision guard before timm)
from craft.retention import retention_loss  # noqa: E402
from prismatic.models import OpenVLA, preset_config  # noqa: E402
from prismatic.models.config import PRESETS  # noqa: E402


def anchor_flops(model: OpenVLA, text_len: int, hidden_layer: int) -> int:
    """One anchor whose prompt has `text_len` tokens (BOS included), image-token mean of `hidden_layer`."""
    import transformers.masking_utils as masking

    probe = masking.find_packed_sequence_indices
    masking.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        with torch.device("meta"):
            ids = torch.ones(1, text_len, dtype=torch.long)
            pixels = torch.zeros(1, 6, *model.config.image_sizes, dtype=torch.bfloat16)
            target = torch.zeros(1, model.language_model.config.hidden_size)

        def anchor_pass():
            hidden = model.hidden_states(pixels, ids, None, layers=(hidden_layer,))[0]
            retention_loss(hidden[:, model.image_token_slice].float().mean(dim=1), target, "mse").backward()
        return counted_flops(anchor_pass)
    finally:
        masking.find_packed_sequence_indices = probe


def run(args: argparse.Namespace) -> dict:
    with torch.device("meta"):
        model = OpenVLA.from_config(preset_config(args.preset)).to(torch.bfloat16).train()
    prefix = anchor_flops(model, model.image_token_slice.start, args.hidden_layer)
    rows = []
    for text_len in args.text_lengths:
        full = anchor_flops(model, text_len, args.hidden_layer)
        rows.append({"text_len": text_len, "full_prompt_flops": full, "saving": 1 - prefix / full})
    return base_record(preset=args.preset, hidden_layer=args.hidden_layer, bos_and_image_flops=prefix, rows=rows)


def summary(r: dict) -> str:
    lines = [f"{r['preset']}: one anchor's forward + backward over BOS and the image: "
             f"{r['bos_and_image_flops'] / 1e12:.3f} TFLOP"]
    lines += [f"  prompt of {row['text_len']} tokens: {row['full_prompt_flops'] / 1e12:.3f} TFLOP, "
              f"saved {row['saving']:.1%}" for row in r["rows"]]
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="openvla-7b", choices=sorted(PRESETS))
    p.add_argument("--text_lengths", type=int, nargs="+", default=[20, 30, 100],
                   help="prompt lengths in tokens, BOS included")
    p.add_argument("--hidden_layer", type=int, default=-2)
    p.add_argument("--out", default=None, help="JSON output file")
    args = p.parse_args(argv)
    if min(args.text_lengths) < 1:
        p.error(f"--text_lengths must be >= 1; found {args.text_lengths}")
    return args


if __name__ == "__main__":
    run_cli(parse_args, run, summary)
