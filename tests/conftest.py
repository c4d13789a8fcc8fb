"""Shared fixtures: one small set of demo assets for every test that launches the trainer."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # set before anything imports Triton: its kernels then run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prismatic.demo import DemoAssetsConfig, make_demo_assets


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Synthetic LIBERO-90 data, a tiny random checkpoint and its anchor cache."""
    out = tmp_path_factory.mktemp("demo")
    make_demo_assets(DemoAssetsConfig(out=out, num_tasks=2, episodes_per_task=4, steps_per_episode=15,
                                      num_anchors=16))
    return out
