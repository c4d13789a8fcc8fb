"""The command line of a draccus entry point, with one-line errors instead of argparse's usage dump.

An unknown flag is answered with the closest real ones (`--craft.epsilom` -> did you mean `--craft.epsilon`?).
A flag of a tuple or list type takes the form `--help` shows, `--trackers jsonl wandb` (or `jsonl,wandb`), as
well as draccus' own `--trackers '[jsonl,wandb]'`: the values are joined into the latter before draccus parses.
"""

import difflib
import typing
from typing import Dict, List, Sequence, Type, TypeVar

from draccus.argparsing import ArgumentParser
from draccus.utils import ParsingError

T = TypeVar("T")


class FlagError(ValueError):
    """A command-line flag that does not parse; the message names it."""


def _is_list_type(tp) -> bool:
    """Tuple[...] / List[...], also inside Optional."""
    if typing.get_origin(tp) in (tuple, list):
        return True
    return typing.get_origin(tp) is typing.Union and any(_is_list_type(arg) for arg in typing.get_args(tp))


def _raise(message: str) -> None:
    raise FlagError(message)


def _parser(config_class: Type[T]) -> ArgumentParser:
    parser = ArgumentParser(config_class=config_class)
    parser.parser.error = _raise  # argparse would print the whole usage, then exit
    return parser


def flag_kinds(config_class: Type[T]) -> Dict[str, bool]:
    """Every flag draccus accepts for `config_class` (nested ones dotted: `--vla.data_mix`) -> whether it takes
    a list."""
    actions = _parser(config_class).parser._actions
    return {option: _is_list_type(action.type) for action in actions for option in action.option_strings
            if option.startswith("--")}


def _suggest(flag: str, known: Sequence[str]) -> str:
    """The closest known flags: those about as close as the best one (a typo shares its section's prefix with
    every flag of the section, which alone makes them look similar)."""
    score = {k: difflib.SequenceMatcher(None, flag, k).ratio() for k in known}
    best = max(score.values(), default=0.0)
    close = sorted((k for k in known if score[k] >= max(0.6, best - 0.1)), key=score.get, reverse=True)[:3]
    return f"unknown flag {flag}" + (f" (did you mean {' or '.join(close)}?)" if close else
                                     "; --help lists every flag")


def normalize_flags(argv: Sequence[str], kinds: Dict[str, bool]) -> List[str]:
    """`argv` with each list flag's values joined as `[a,b]`; raises FlagError on an unknown flag (naming the
    closest known ones) or on several values after a flag that takes one."""
    groups: List[List[str]] = []
    for token in argv:
        if token.startswith("--"):
            groups.append(token.split("=", 1))
        elif not groups:
            raise FlagError(f"unexpected value {token!r} before any flag: every value follows its --flag")
        else:
            groups[-1].append(token)
    unknown = [flag for flag, *_ in groups if flag not in kinds]
    if unknown:
        raise FlagError("; ".join(_suggest(flag, list(kinds)) for flag in unknown))
    out: List[str] = []
    for flag, *values in groups:
        if kinds[flag] and values and not (len(values) == 1 and values[0].lstrip().startswith(("[", "("))):
            values = ["[" + ",".join(values) + "]"]
        elif len(values) > 1:
            raise FlagError(f"{flag} takes one value; found {len(values)}: {' '.join(values)}")
        out += [flag, *values]
    return out


def parse_flags(config_class: Type[T], argv: Sequence[str]) -> T:
    """The config `argv` asks for; raises FlagError, with one line naming the flag, for any mistake in it."""
    if "-h" in argv or "--help" in argv:
        return _parser(config_class).parse_args(list(argv))  # prints the help and exits
    argv = normalize_flags(argv, flag_kinds(config_class))
    try:
        return _parser(config_class).parse_args(argv)
    except ParsingError as e:  # a value that does not fit the flag's type: "`craft.epsilon`: Couldn't parse ..."
        name, quoted, rest = str(e).lstrip("`").partition("`")
        raise FlagError(f"--{name}{rest}" if quoted and str(e).startswith("`") else str(e)) from None
