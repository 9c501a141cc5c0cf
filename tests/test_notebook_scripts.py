"""Each notebook calls the one ``utils`` entry function its scripts call, so the two cannot drift apart.

Read by AST, nothing is executed. :data:`PAIRS` names each notebook's scripts and the entry
function both must import from its module and call (a script may reach it through the
``utils.cli`` module it imports from). The notebook passes the function only keywords it
accepts, and builds the arguments named in :data:`BUILT_BY` with the same loader as the scripts.
Every notebook names the project's kernel, has no ``def`` or ``class`` (logic lives in ``utils``),
and any experiment file it names is a ``configs/*_quick.yaml`` (or a run's saved ``config.yaml``).
"""

from __future__ import annotations

import ast
import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
LOADER = "utils.config.experiment.load_experiment_config"

#: notebook -> (the scripts it mirrors, the entry function both call).
PAIRS = {
    "train.ipynb": (("scripts/train_3d_unet.py", "scripts/train_unetr.py"), "utils.training.engine.train"),
    "evaluate_run.ipynb": (("scripts/eval_unet.py", "scripts/eval_unetr.py"), "utils.evaluation.run.evaluate_run"),
    "compare_models.ipynb": (("scripts/compare_models.py",), "utils.evaluation.report.write_comparison_report"),
    "synthetic_data.ipynb": (("scripts/make_synthetic_data.py",), "utils.synthetic.dataset.generate_dataset"),
}
#: entry function -> the function its first argument is built by, in notebooks and scripts alike.
BUILT_BY = {"utils.training.engine.train": LOADER}
#: The kernel ``make lab`` registers; every notebook names it.
KERNELSPEC = {"name": "kits19-segmentation", "display_name": "Python (kits19-segmentation)", "language": "python"}


def imports_of(tree: ast.Module) -> dict[str, str]:
    """Local name -> ``module.name`` for every ``from module import name``."""
    return {a.asname or a.name: f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            for a in n.names}


def calls_of(tree: ast.Module) -> dict[str, list[ast.Call]]:
    """Calls of imported names, by the dotted name they were imported as."""
    imports, calls = imports_of(tree), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imports:
            calls.setdefault(imports[node.func.id], []).append(node)
    return calls


def built_by(expr: ast.expr, tree: ast.Module, function: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``expr`` calls ``function``, itself or through the names it reads (assigned in ``tree``)."""
    imports = imports_of(tree)
    for node in ast.walk(expr):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and imports.get(node.func.id) == function:
            return True
        if isinstance(node, ast.Name) and node.id not in seen:
            values = [a.value for a in ast.walk(tree) if isinstance(a, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)]
            if any(built_by(value, tree, function, seen | {node.id}) for value in values):
                return True
    return False


def script_calls(script: str, read=Path.read_text) -> dict[str, list[ast.Call]]:
    """The script's calls, with those of each ``utils.cli`` module it imports from (its command line)."""
    tree = ast.parse(read(REPO / script))
    calls = calls_of(tree)
    commands = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("utils.cli.")}
    for module in commands:
        for name, sites in calls_of(ast.parse(read(REPO / (module.replace(".", "/") + ".py")))).items():
            calls.setdefault(name, []).extend(sites)
    return calls


@lru_cache(maxsize=None)
def accepted_keywords(function: str) -> set[str] | None:
    """The parameter names of a ``utils`` function (``None`` when it takes ``**kwargs``)."""
    module, _, name = function.rpartition(".")
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    args = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name).args
    return None if args.kwarg else {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}


def notebook_tree(notebook: dict[str, Any]) -> ast.Module:
    """The code cells as one module; IPython magics (``%``, ``!``) become comments."""
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    return ast.parse("\n".join("# " + line if line.lstrip().startswith(("%", "!")) else line
                               for cell in cells for line in cell.splitlines()))


def disagreements(name: str, notebook: dict[str, Any], read=Path.read_text) -> list[str]:
    """Every way the notebook ``name`` (its JSON, so tests can alter a copy) breaks the rules above."""
    tree = notebook_tree(notebook)
    problems = [f"defines {n.name}: logic belongs in utils" for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    yaml_names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and str(n.value).endswith(".yaml")}
    if LOADER in calls_of(tree) and not any(s.endswith("_quick.yaml") for s in yaml_names):
        problems.append("loads an experiment config but names no configs/*_quick.yaml")
    problems += [f"names {s}, not a _quick config" for s in sorted(yaml_names)
                 if not s.endswith("_quick.yaml") and s != "config.yaml"]
    scripts, entry = PAIRS.get(name, ((), None))
    for side, calls in [("the notebook", calls_of(tree))] + [(s, script_calls(s, read)) for s in scripts]:
        problems += [f"{side} does not call {function}" for function in (entry, BUILT_BY.get(entry))
                     if function and function not in calls]
    for call in calls_of(tree).get(entry, []):
        accepted = accepted_keywords(entry)
        problems += [f"passes {k.arg}, which {entry} does not accept" for k in call.keywords
                     if accepted is not None and k.arg not in accepted]
        if entry in BUILT_BY and not (call.args and built_by(call.args[0], tree, BUILT_BY[entry])):
            problems.append(f"{entry}'s first argument is not built by {BUILT_BY[entry]}")
    return [f"notebooks/{name}: {problem}" for problem in problems]


@lru_cache(maxsize=None)
def _read_notebook(name: str) -> dict[str, Any]:
    return json.loads((NOTEBOOKS / name).read_text())


def edited(name: str, old: str, new: str) -> dict[str, Any]:
    """A copy of a notebook with ``old`` replaced by ``new`` in its one code cell holding it."""
    notebook = copy.deepcopy(_read_notebook(name))
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and old in "".join(c["source"])]
    assert len(cells) == 1, f"{old!r} should be in exactly one code cell of {name}"
    cells[0]["source"] = "".join(cells[0]["source"]).replace(old, new)
    return notebook


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_agrees_with_its_scripts(name):
    assert disagreements(name, _read_notebook(name)) == []


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_uses_the_project_kernel(name):
    assert _read_notebook(name)["metadata"].get("kernelspec") == KERNELSPEC, \
        f"notebooks/{name}: kernelspec must be {KERNELSPEC} (the kernel `make lab` registers)"


def test_every_pair_exists_and_each_model_key_has_a_quick_config():
    for notebook, (scripts, _) in PAIRS.items():
        assert (NOTEBOOKS / notebook).is_file() and all((REPO / s).is_file() for s in scripts), (notebook, scripts)
    for notebook in ("train.ipynb", "evaluate_run.ipynb"):  # one script per model key, called with its key
        keys = [call.args[0].value for script in PAIRS[notebook][0] for call in ast.walk(ast.parse(
                (REPO / script).read_text())) if isinstance(call, ast.Call) and call.args
                and isinstance(call.args[0], ast.Constant)]
        assert sorted(keys) == ["resunet3d", "unetr2d"], (notebook, keys)
        assert all((REPO / f"configs/{key}_quick.yaml").is_file() for key in keys)


@pytest.mark.parametrize(("name", "old", "new", "expected"), [
    ("evaluate_run.ipynb", "result = evaluate_run(run,", "result = find_latest_run(run,",
     "the notebook does not call utils.evaluation.run.evaluate_run"),  # another function, or the call dropped
    ("train.ipynb", "from utils.training.engine import train", "from utils.training.search import train",
     "the notebook does not call utils.training.engine.train"),  # the same name from another module
    ("compare_models.ipynb", "n_resamples=BOOTSTRAP)", "n_resamples=BOOTSTRAP, alpha=0.1)",
     "passes alpha, which utils.evaluation.report.write_comparison_report does not accept"),
    ("train.ipynb", "result = train(config,", "result = train(RESUME,",
     "first argument is not built by utils.config.experiment.load_experiment_config"),
    ("train.ipynb", '_quick.yaml"', '.yaml"', "names .yaml, not a _quick config"),
    ("synthetic_data.ipynb", "SEED = 0", "SEED = 0\ndef seed():\n    return 0", "defines seed"),
])
def test_a_notebook_that_drifts_is_reported(name, old, new, expected):
    assert any(expected in problem for problem in disagreements(name, edited(name, old, new))), expected


def test_a_script_that_drifts_is_reported():
    def read(path: Path) -> str:  # the evaluation command imports evaluate_run from another module
        text = path.read_text()
        return text.replace("from utils.evaluation.run import", "from utils.evaluation.comparison import") \
            if path.name == "evaluate.py" else text

    assert disagreements("evaluate_run.ipynb", _read_notebook("evaluate_run.ipynb"), read) == [
        f"notebooks/evaluate_run.ipynb: {script} does not call utils.evaluation.run.evaluate_run"
        for script in ("scripts/eval_unet.py", "scripts/eval_unetr.py")]
