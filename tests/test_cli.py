"""train_craft.py's command line: an unknown flag is answered with the closest real one, and a list flag takes
the form --help shows (`--trackers jsonl wandb`) as well as draccus' `--trackers '[jsonl,wandb]'`."""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest

from prismatic.conf.cli import FlagError, flag_kinds, parse_flags
from prismatic.conf.train import TrainConfig


@pytest.mark.parametrize("typo,meant", [
    ("--craft.epsilom", "--craft.epsilon"), ("--craf.epsilon", "--craft.epsilon"), ("--seedd", "--seed"),
    ("--vla.learning_rte", "--vla.learning_rate"), ("--eval.intervl", "--eval.interval"),
    ("--craft.lamda_lr", "--craft.lambda_lr"), ("--resume", "--resume_from"),
])
def test_a_typo_names_the_flag_meant(typo, meant):
    with pytest.raises(FlagError) as err:
        parse_flags(TrainConfig, ["--seed", "3", typo, "0.1"])
    assert str(err.value) == f"unknown flag {typo} (did you mean {meant}?)"


def test_every_unknown_flag_is_named_in_one_line():
    with pytest.raises(FlagError) as err:
        parse_flags(TrainConfig, ["--zzzqqq=1", "--save_intervall", "5"])
    assert str(err.value) == ("unknown flag --zzzqqq; --help lists every flag; "
                              "unknown flag --save_intervall (did you mean --save_interval?)")


@pytest.mark.parametrize("argv,trackers", [
    (["--trackers", "jsonl", "wandb"], ("jsonl", "wandb")),
    (["--trackers", "[jsonl,wandb]"], ("jsonl", "wandb")),
    (["--trackers", "jsonl,wandb"], ("jsonl", "wandb")),
    (["--trackers", "wandb"], ("wandb",)),  # draccus alone reads "wandb" as the characters w, a, n, d, b
    (["--trackers=wandb", "--seed", "3"], ("wandb",)),
])
def test_the_list_forms_parse(argv, trackers):
    assert parse_flags(TrainConfig, argv).trackers == trackers


@dataclass
class _Inner:
    sizes: Optional[Tuple[int, ...]] = None
    name: str = "x"


@dataclass
class _Outer:
    steps: Tuple[int, ...] = (1,)
    inner: _Inner = field(default_factory=_Inner)


def test_every_list_flag_of_a_config_takes_both_forms():
    assert flag_kinds(_Outer) == {"--help": False, "--config_path": False, "--steps": True, "--inner": False,
                                  "--inner.sizes": True, "--inner.name": False}
    cfg = parse_flags(_Outer, ["--steps", "3", "4", "--inner.sizes", "[5,6]", "--inner.name", "y"])
    assert (cfg.steps, cfg.inner.sizes, cfg.inner.name) == ((3, 4), (5, 6), "y")


@pytest.mark.parametrize("argv,message", [
    (["--craft.epsilon", "0.1", "0.2"], "--craft.epsilon takes one value; found 2: 0.1 0.2"),
    (["--craft.epsilon", "abc"], "--craft.epsilon: Couldn't parse 'abc' into a float"),
    (["0.1"], "unexpected value '0.1' before any flag: every value follows its --flag"),
    (["--craft.enabled"], "argument --craft.enabled: expected one argument"),
])
def test_other_mistakes_are_one_line(argv, message):
    with pytest.raises(FlagError) as err:
        parse_flags(TrainConfig, argv)
    assert str(err.value) == message


def test_negative_values_and_plain_flags_pass_unchanged():
    cfg = parse_flags(TrainConfig, ["--craft.hidden_layer", "-3", "--vla.lora_target_modules", "q_proj,v_proj"])
    assert (cfg.craft.hidden_layer, cfg.vla.lora_target_modules, cfg.trackers) == (-3, "q_proj,v_proj", ("jsonl",))


def test_help_still_prints_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        parse_flags(TrainConfig, ["--craft.epsilom", "0.1", "--help"])
    assert done.value.code == 0
    assert "--craft.epsilon" in capsys.readouterr().out
