"""The project's layout: which of its own modules each one imports. No module imports one that imports it
back (directly or through a chain), so each file can be read after the ones it uses; pre-training's data
(data.py) does not reach fine-tuning's (finetune_data.py) or the preparation tools (prepare.py); and no
module is named like a well-known package (a `datasets.py` here would hide, or be hidden by, Hugging Face's)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(ROOT.glob("*.py")) + sorted((ROOT / "experiments").glob("*.py"))
OWN = {f.stem for f in FILES}  # experiments/*.py put the root on sys.path and import each other by name


def imports(path: Path) -> set[str]:
    """The project's own modules that `path` imports anywhere: at the top, inside functions, under
    `if __name__ == "__main__"`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


GRAPH = {f.stem: imports(f) & OWN - {f.stem} for f in FILES}


def test_no_module_imports_one_that_imports_it_back():
    done, path = set(), []

    def visit(name):  # depth first; a module met again on the current path closes a cycle
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for other in sorted(GRAPH[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_pretraining_data_does_not_import_fine_tuning_or_the_tools():
    assert not GRAPH["data"] & {"prepare", "finetune_data", "finetune", "train"}, GRAPH["data"]


def test_nothing_imports_the_old_datasets_module():
    assert not (ROOT / "datasets.py").exists()
    importers = [f.name for f in FILES + sorted((ROOT / "tests").glob("*.py")) if "datasets" in imports(f)]
    assert not importers, f"{importers} import `datasets` (the fine-tuning data is in finetune_data.py)"


def test_load_pretrained_has_one_home():
    import checkpoints
    import mrm

    assert hasattr(checkpoints, "load_pretrained") and not hasattr(mrm, "load_pretrained")


def test_data_py_run_as_a_command_points_to_prepare_py():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "data.py"), "synth", "--out", "x"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "python prepare.py synth --out x" in done.stderr
