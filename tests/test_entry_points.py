"""Every draccus entry point prints its --help: draccus turns field comments into argparse help, where a bare
percent sign (say, "10% of") breaks the formatting and `--help` crashes instead of helping. A mistyped flag of a
launched run ends torchrun's report with the one line that names the flag meant."""

import pytest
import draccus
from launch import error_line, run_script

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


def test_a_mistyped_flag_ends_torchruns_report_with_the_flag_meant(tmp_path):
    res = run_script(["--run_root_dir", str(tmp_path), "--craft.epsilom", "0.1", "--trackers", "jsonl", "wandb"])
    assert error_line(res) == "train_craft.py: error: unknown flag --craft.epsilom (did you mean --craft.epsilon?)"
    assert "usage:" not in res.stderr and list(tmp_path.iterdir()) == []
