"""The project's layout: the top level holds what a learner reads and runs, machinery/ what they need not
read. No module imports one that imports it back (directly or through a chain, function-level imports
included), machinery/ imports no script, pre-training's data (data.py) does not reach fine-tuning's or
the preparation tools, and no module is named like a well-known package (a `datasets.py` here would hide,
or be hidden by, Hugging Face's)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = sorted(ROOT.glob("*.py"))
MACHINERY = sorted((ROOT / "machinery").glob("*.py"))
FILES = TOP + MACHINERY + sorted((ROOT / "experiments").glob("*.py"))


def name(path: Path) -> str:
    """machinery/runs.py -> 'machinery.runs'; a top-level file or an experiment (experiments put the root on
    sys.path and import each other by name) -> its stem."""
    if path.parent.name == "machinery":
        return "machinery" if path.stem == "__init__" else f"machinery.{path.stem}"
    return path.stem


OWN = {name(f) for f in FILES}


def imports(path: Path) -> set[str]:
    """The project's own modules that `path` imports anywhere: at the top, inside functions, under
    `if __name__ == "__main__"`. `from machinery import runs` imports machinery.runs."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in OWN}


GRAPH = {name(f): imports(f) - {name(f)} for f in FILES}


def test_no_module_imports_one_that_imports_it_back():
    done, path = set(), []

    def visit(module):  # depth first; a module met again on the current path closes a cycle
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for other in sorted(GRAPH[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_machinery_imports_no_script():
    # what a learner need not read never reaches back into what they read: only the model (checkpoints are
    # checked against it) and the recipe tables
    for module, used in GRAPH.items():
        if module.startswith("machinery"):
            assert {m for m in used if not m.startswith("machinery")} <= {"mrm", "recipes"}, (module, used)


def test_machinery_init_imports_nothing():
    # importing one module of the folder must not import the others (it would bring mrm in with errors.py)
    assert GRAPH["machinery"] == set()


def test_pretraining_data_does_not_import_fine_tuning_or_the_tools():
    assert not GRAPH["data"] & {"prepare", "finetune_data", "finetune", "train"}, GRAPH["data"]


def test_the_top_level_is_what_a_learner_reads_and_runs():
    assert [f.name for f in TOP] == ["bench.py", "checks.py", "data.py", "finetune.py", "finetune_data.py",
                                     "mrm.py", "prepare.py", "recipes.py", "train.py"]
    mapped = re.findall(r"^\| `(\w+\.py)`", (ROOT / "README.md").read_text(), flags=re.M)
    assert sorted(mapped) == [f.name for f in TOP]  # the README's file map names each, once


def test_the_learners_files_open_with_the_method_and_stay_small():
    lines = {f: (ROOT / f).read_text().splitlines() for f in ("mrm.py", "data.py", "train.py", "finetune.py")}
    sizes = {f: len(v) for f, v in lines.items()}
    assert sizes["mrm.py"] <= 520 and sizes["data.py"] <= 350 and sizes["train.py"] <= 500, sizes
    assert sizes["finetune.py"] <= 560 and sum(sizes.values()) <= 1900, sizes
    first = next(n for n, line in enumerate(lines["mrm.py"], 1) if re.match(r"def (patchify|random_masking)", line))
    assert first <= 110  # the model code comes before any plumbing
    fit = next(n for n, line in enumerate(lines["finetune.py"], 1) if line.startswith("def fit("))
    assert fit < 330
    start = next(n for n, line in enumerate(lines["train.py"]) if line.startswith("def train("))
    end = next(n for n, line in enumerate(lines["train.py"][start + 1:], start + 1) if line and not line[0].isspace())
    assert len(lines["train.py"][start:end]) - 2 <= 110  # def train(...) to its return, less the two blank lines


def test_no_module_takes_a_common_package_name():
    assert not (ROOT / "datasets.py").exists()
    importers = [f.name for f in FILES + sorted((ROOT / "tests").glob("*.py"))
                 if "datasets" in {a.name for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Import)
                                   for a in n.names}]
    assert not importers, f"{importers} import `datasets` (the fine-tuning data is in finetune_data.py)"


def test_load_pretrained_has_one_home():
    import mrm
    from machinery import checkpoints

    assert hasattr(checkpoints, "load_pretrained") and not hasattr(mrm, "load_pretrained")


def test_data_py_run_as_a_command_points_to_prepare_py():
    done = subprocess.run([sys.executable, str(ROOT / "data.py"), "synth", "--out", "x"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "python prepare.py synth --out x" in done.stderr
