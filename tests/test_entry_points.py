"""Every draccus entry point prints its --help: draccus turns field comments into argparse help, where a bare
percent sign (say, "10% of") breaks the formatting and `--help` crashes instead of helping."""

import pytest
import draccus

from prismatic.conf.train import TrainConfig
from prismatic.demo import DemoAssetsConfig
from prismatic.sim.evaluate import LiberoEvalConfig
from prismatic.training.anchor_builder import AnchorCacheConfig


@pytest.mark.parametrize("config", [TrainConfig, AnchorCacheConfig, DemoAssetsConfig, LiberoEvalConfig])
def test_help_prints_every_flag(config, capsys):
    with pytest.raises(SystemExit) as done:
        draccus.parse(config, args=["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--seed" in out  # every one of them has a seed flag
