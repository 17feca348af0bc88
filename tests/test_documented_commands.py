"""Every command the README and the docs show is one the scripts accept: each flag exists and each value
parses, and where a command needs no file it does not have, its --dry_run plan is one JSON object."""
import argparse
import contextlib
import importlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]


def commands(text: str) -> list[str]:
    """`python X.py ...` and `torchrun ... X.py ...` lines of the bash blocks (continuations joined, comments
    dropped) and of inline code."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split(" #")[0].strip())
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    return [c for c in found if c.startswith(("python ", "torchrun ")) and ".py" in c]


def script_and_args(command: str):
    """('train.py', [args]) for a project script, else None (pip, pytest, other tools)."""
    if "|" in command:  # a list of alternatives (`prepare.py synth|resize|...`), not one command
        return None
    words = [w for w in shlex.split(command) if w != "..."]
    if words[1:2] == ["-m"]:  # python -m pytest tests/test_mrm.py: a tool, not a script of this project
        return None
    at = next((k for k, w in enumerate(words) if w.endswith(".py")), None)
    if at is None or not (ROOT / words[at]).is_file():
        return None
    return words[at], words[at + 1:]


DOCUMENTED = sorted({(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in commands(page.read_text())
                     if script_and_args(c)})


def test_the_pages_show_commands():
    scripts = {script_and_args(c)[0] for _, c in DOCUMENTED}
    assert {"train.py", "finetune.py", "bench.py"} <= scripts and len(DOCUMENTED) >= 30


class Parsed(Exception):
    pass


def module_of(script: str):
    sys.path.insert(0, str(ROOT / Path(script).parent))
    try:
        return importlib.import_module(Path(script).stem)
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("page, command", DOCUMENTED)
def test_documented_command_parses(page, command, monkeypatch, tmp_path, capsys):
    """The script's own parser takes the command's flags and values (the run stops right after parsing)."""
    script, args = script_and_args(command)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, argv, namespace)  # a bad flag or value exits 2 here, with the parser's message
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(tmp_path)
    if "--help" in args or "-h" in args:  # the help is printed and the script exits 0
        with pytest.raises(SystemExit) as stop:
            module_of(script).main(args)
        assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    with pytest.raises(Parsed):
        module_of(script).main(args)


DRY_RUNS = [(p, c) for p, c in DOCUMENTED if script_and_args(c)[0] in ("train.py", "finetune.py")
            and "--resume" not in c and "--help" not in c]


@pytest.mark.parametrize("page, command", DRY_RUNS)
def test_documented_run_plans_as_json(page, command, monkeypatch, tmp_path, capsys):
    """--dry_run of each documented train.py / finetune.py command prints one JSON object on stdout, unless
    it needs a file this clean folder lacks (a dataset, MRM.pth): then that file is what the error names."""
    script, args = script_and_args(command)
    monkeypatch.chdir(tmp_path)
    try:
        module_of(script).main([*args, "--dry_run"])
    except SystemExit as e:
        err = capsys.readouterr().err
        named = [a for a in args if not a.startswith("--") and a in err]
        assert e.code == 2 and named, f"{command}: {err}"
        return
    out = capsys.readouterr().out
    plan = json.loads(out)
    assert isinstance(plan, dict) and out.count("\n") == 1
