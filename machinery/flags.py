"""Command-line flags: one per field of a script's config dataclass, its help the comment beside the
field, each number checked against its range as it is parsed, and a bad flag reported in one line."""
import argparse
import inspect
import math
import re
from dataclasses import fields


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, `SCRIPT: error: ...`, exit status 2 (without the usage,
    which for these scripts is a screenful): the same form as every other expected error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def bounded(kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """An argparse type: `kind` (int or float), finite, within [low, high] (an open end where asked)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (value <= low if low_open else value < low)) or \
                (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if low_open else '['}{low}, "
                                             f"{high if high is not None else 'inf'}{')' if high_open else ']'}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def config_parser(config, prog: str, doc: str, choices: dict, limits: dict, shown_default=None,
                  given_only: bool = False):
    """An argparse parser with one flag per field of the dataclass `config` (train.py's and finetune.py's);
    each flag's help is the comment beside its field, and its value is checked against `limits` (name ->
    type, as `bounded` makes) as it is parsed. given_only: the namespace holds only the flags given."""
    parser = OneLineParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS if given_only else None)
    helps = dict(re.findall(r"^    (\w+): [^#\n]*# (.*)$", inspect.getsource(config), flags=re.M))
    for f in fields(config):
        kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))  # int | None -> int
        shown = shown_default(f) if shown_default else f.default  # None: the help itself says it
        kw = {"help": (helps.get(f.name, "") + ("" if shown is None else f" (default: {shown})")).replace("%", "%%")}
        if not given_only:
            kw["default"] = f.default
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(f"--{f.name}", type=limits.get(f.name, kind), choices=choices.get(f.name), **kw)
    return parser
