"""Shared fixtures: one small set of demo assets for every test that launches the trainer."""

import os
from dataclasses import replace

import pytest
import torch

if not torch.cuda.is_available():  # set before anything imports Triton: its kernels then run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prismatic.demo import DemoAssetsConfig, make_demo_assets

# float32: the fast dtype on CPUs (benchmarks/RESULTS.md), and the one launch.user_flags trains in.
DEMO = DemoAssetsConfig(num_tasks=2, episodes_per_task=4, steps_per_episode=15, num_anchors=16, dtype="float32")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Synthetic LIBERO-90 data, a tiny random checkpoint and its anchor cache."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_assets(replace(DEMO, out=out))
    return out


@pytest.fixture(scope="session")
def demo_bf16_cache(demo, tmp_path_factory):
    """The demo's anchors (same draw, same held-out episodes) with features computed in bfloat16, for the tests
    of mixed-precision behaviour; the data and checkpoint are the demo's own, linked."""
    out = tmp_path_factory.mktemp("demo_bf16")
    for name in ("rlds", "model"):
        (out / name).symlink_to(demo / name)
    make_demo_assets(replace(DEMO, out=out, dtype="bfloat16"))
    return out / "anchor_cache"
