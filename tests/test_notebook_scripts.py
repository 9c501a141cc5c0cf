"""Each notebook and its script make the same calls into ``utils``, so the two cannot drift apart.

Read by AST, nothing is executed. From a script's ``main`` the checker follows calls into the
script's own functions and into the command modules (``utils/cli/*.py``); every other
``utils`` callable it meets is a work function of the script (``utils.training.engine.train``,
``utils.evaluation.run.evaluate_run``, ...). The paired notebook must call each of them (but
those in :data:`SCRIPT_ONLY`, which serve command-line options only), imported
from the same module, with the same positional arguments and keywords, and with arguments built
by the same ``utils`` functions (``train``'s config comes from ``load_experiment_config`` in both).
A notebook may leave out only the keywords listed in :data:`KEYWORDS_LEFT_AT_DEFAULT`, each checked
to give the function's own default when the script runs with its command-line defaults. A
notebook's calls of another script's work functions (an evaluation notebook that trains first)
are held to that script's calls too, omitting only keywords that are at their default there.
For a script of one model the notebook loads that model's quick config (the one the script
documents) with ``load_experiment_config`` and names no other model. Every notebook keeps its
logic in ``utils`` (no ``def`` or ``class`` in code cells) and names the project's kernel.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"

#: notebook -> the script it mirrors.
PAIRS = {
    "train_3d_unet.ipynb": "scripts/train_3d_unet.py",
    "train_unetr.ipynb": "scripts/train_unetr.py",
    "eval_unet.ipynb": "scripts/eval_unet.py",
    "eval_unetr.ipynb": "scripts/eval_unetr.py",
    "compare_models.ipynb": "scripts/compare_models.py",
    "synthetic_data.ipynb": "scripts/make_synthetic_data.py",
}

#: The kernel ``make lab`` registers; every notebook names it.
KERNELSPEC = {"name": "kits19-segmentation", "display_name": "Python (kits19-segmentation)", "language": "python"}

#: Work functions a script reaches that its notebook need not call, and why.
SCRIPT_ONLY = {
    "utils.evaluation.comparison.resolve_report_folder": "turns command-line run folders into report folders; "
                                                    "the notebook evaluates its runs itself",
    "utils.synthetic.dataset.generate_from_masks": "the --from-masks option (CT synthesised around real masks)",
}

#: Keywords a script passes from a command-line option that its notebook may leave at the default.
KEYWORDS_LEFT_AT_DEFAULT = {
    "utils.training.engine.train": {"wandb"},
    "utils.evaluation.run.evaluate_run": {"out_dir", "device", "tta", "postprocess", "tolerance_mm"},
    "utils.evaluation.report.write_comparison_report": {"seed"},
    "utils.synthetic.dataset.generate_dataset": {"workers"},
    "utils.synthetic.dataset.SyntheticOptions": {"spacing"},
}


@dataclass(frozen=True)
class Source:
    """One parsed file: a script, a ``utils`` module or a notebook's code cells joined."""

    label: str  # how messages name it, e.g. "scripts/eval_unet.py"
    module: str  # dotted name of its own functions, e.g. "utils.cli.train"
    tree: ast.Module
    imports: dict[str, str]  # local name -> dotted name of what it is bound to
    functions: dict[str, ast.FunctionDef]
    cell_lines: tuple[tuple[int, int], ...] = ()  # a notebook's (first line, cell index) of each code cell

    def place(self, node: ast.AST) -> str:
        """Where ``node`` is: ``cell N`` (counting every cell from 0) in a notebook, else ``line N``."""
        cell = next((index for first, index in reversed(self.cell_lines) if first <= node.lineno), None)
        return f"line {node.lineno}" if cell is None else f"cell {cell}"


@dataclass(frozen=True)
class CallSite:
    """A call of a work function, where it is made (``scope``: the enclosing function)."""

    call: ast.Call
    scope: ast.AST
    source: Source

    @property
    def where(self) -> str:
        name = getattr(self.scope, "name", None)
        return f"{self.source.module}.{name}" if name else self.source.label


def parse_source(label: str, module: str, text: str, cell_lines: tuple[tuple[int, int], ...] = ()) -> Source:
    tree = ast.parse(text, filename=label)
    imports: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imports.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Import):
            imports.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                            for a in node.names})
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    return Source(label, module, tree, imports, functions, cell_lines)


@lru_cache(maxsize=None)
def load_module(module: str) -> Source:
    """A script or ``utils`` module by dotted name (``scripts.eval_unet``, ``utils.cli.evaluate``)."""
    path = REPO / (module.replace(".", "/") + ".py")
    return parse_source(str(path.relative_to(REPO)), module, path.read_text())


def cell_text(cell: dict[str, Any]) -> str:
    """A cell's source as one string (the notebook JSON may store it as a list of lines)."""
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def notebook_source(name: str, notebook: dict[str, Any]) -> Source:
    """The notebook's code cells as one module; IPython magics (``%``, ``!``) become comments."""
    lines: list[str] = []
    cell_lines = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            cell_lines.append((len(lines) + 1, index))
            lines += ["# " + line if line.lstrip().startswith(("%", "!")) else line
                      for line in cell_text(cell).splitlines()] + [""]
    return parse_source(f"notebooks/{name}", f"notebooks.{Path(name).stem}", "\n".join(lines), tuple(cell_lines))


def qualify(func: ast.expr, source: Source) -> str | None:
    """The dotted name a call target refers to in ``source``, or None when unknown."""
    if isinstance(func, ast.Name):
        if func.id in source.functions:
            return f"{source.module}.{func.id}"
        return source.imports.get(func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in source.imports:
        module = source.imports[func.value.id]
        if "." not in module or (REPO / (module.replace(".", "/") + ".py")).is_file():  # a module, not a name in one
            return f"{module}.{func.attr}"
    return None


def followed(qualname: str, source: Source) -> tuple[Source, ast.FunctionDef] | None:
    """The function behind ``qualname`` when the checker walks into it: the file's own, or a command's."""
    module, _, name = qualname.rpartition(".")
    if module == source.module:
        target = source
    elif re.fullmatch(r"utils\.cli\.\w+", module):
        target = load_module(module)
    else:
        return None
    function = target.functions.get(name)
    return (target, function) if function is not None else None


def is_work_function(qualname: str | None) -> bool:
    return bool(qualname) and qualname.startswith("utils.") and not re.match(r"utils\.cli\.\w+\.", qualname)


@dataclass(frozen=True)
class ScriptReach:
    """What a script's ``main`` calls in ``utils``, and with which command-line defaults."""

    script: str
    model_name: str | None
    calls: dict[str, list[CallSite]]
    option_defaults: dict[str, Any]
    required_options: frozenset[str]
    sources: tuple[Source, ...]


def _walk_calls(source: Source, function: ast.AST, calls: dict[str, list[CallSite]], visited: set[str],
                sources: list[Source]) -> None:
    if source not in sources:
        sources.append(source)
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        qualname = qualify(node.func, source)
        target = followed(qualname, source) if qualname else None
        if target is not None:
            if qualname not in visited:
                visited.add(qualname)
                _walk_calls(*target, calls, visited, sources)
        elif is_work_function(qualname):
            calls.setdefault(qualname, []).append(CallSite(node, function, source))


def _evaluate(expr: ast.expr, names: dict[str, Any]) -> Any:
    code = compile(ast.Expression(body=expr), "<default>", "eval")
    return eval(code, {"__builtins__": builtins, "Path": Path, **names})  # noqa: S307 (literals of our files)


def _options(sources: list[Source]) -> tuple[dict[str, Any], set[str]]:
    """Defaults of the ``add_argument`` options in ``sources`` by ``dest``, and the required ones."""
    defaults: dict[str, Any] = {}
    required: set[str] = set()
    for source in sources:
        for node in ast.walk(source.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            keywords = {k.arg: k.value for k in node.keywords}
            long = next((f for f in flags if f.startswith("--")), flags[0])
            dest = keywords["dest"].value if "dest" in keywords else long.lstrip("-").replace("-", "_")
            action = keywords["action"].value if "action" in keywords else None
            if "default" in keywords:
                defaults[dest] = _evaluate(keywords["default"], {})
            else:
                defaults[dest] = {"store_true": False, "store_false": True}.get(action)
            if not long.startswith("-") or (isinstance(keywords.get("required"), ast.Constant)
                                            and keywords["required"].value is True):
                required.add(dest)
    return defaults, required


@lru_cache(maxsize=None)
def script_reach(script: str) -> ScriptReach:
    source = load_module(script.removesuffix(".py").replace("/", "."))
    main = source.functions["main"]
    calls: dict[str, list[CallSite]] = {}
    sources: list[Source] = []
    _walk_calls(source, main, calls, {f"{source.module}.main"}, sources)
    model_name = next((k.value.value for node in ast.walk(main) if isinstance(node, ast.Call)
                       for k in node.keywords if k.arg == "model_name" and isinstance(k.value, ast.Constant)), None)
    defaults, required = _options(sources)
    return ScriptReach(script, model_name, calls, defaults, frozenset(required), tuple(sources))


def assigned_values(scope: ast.AST, name: str) -> list[ast.expr]:
    values = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values.append(node.value)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and isinstance(node.target, ast.Name) \
                and node.target.id == name and node.value is not None:
            values.append(node.value)
    return values


def origins(expr: ast.expr, scope: ast.AST, source: Source, seen: set | None = None) -> set[str]:
    """The work functions whose results ``expr`` is built from (through names and the file's own functions)."""
    seen = set() if seen is None else seen
    found: set[str] = set()
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            qualname = qualify(node.func, source)
            target = followed(qualname, source) if qualname else None
            if target is not None and qualname not in seen:
                seen.add(qualname)
                for ret in ast.walk(target[1]):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        found |= origins(ret.value, target[1], target[0], seen)
            elif is_work_function(qualname):
                found.add(qualname)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and (id(scope), node.id) not in seen:
            seen.add((id(scope), node.id))
            for value in assigned_values(scope, node.id):
                found |= origins(value, scope, source, seen)
    return found


def strings(expr: ast.expr, scope: ast.AST) -> set[str]:
    """String constants in ``expr``, following names assigned in ``scope``."""
    found, pending, seen = set(), [expr], set()
    while pending:
        for node in ast.walk(pending.pop()):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
            elif isinstance(node, ast.Name) and node.id not in seen:
                seen.add(node.id)
                pending += assigned_values(scope, node.id)
    return found


@lru_cache(maxsize=None)
def parameter_defaults(qualname: str) -> dict[str, ast.expr]:
    """Default expressions of a ``utils`` function's parameters (or of a dataclass's fields)."""
    module, _, name = qualname.rpartition(".")
    node = next((n for n in load_module(module).tree.body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
    if isinstance(node, ast.ClassDef):
        return {n.target.id: n.value for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None}
    if node is None:
        return {}
    positional = node.args.posonlyargs + node.args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(node.args.defaults):]], node.args.defaults))
    defaults.update({a.arg: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None})
    return defaults


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, PurePath) else value


def default_mismatch(qualname: str, keyword: str, site: CallSite, reach: ScriptReach) -> str | None:
    """None when the script passes ``keyword`` its default at command-line defaults; else why not."""
    value = next(k.value for k in site.call.keywords if k.arg == keyword)
    used = {n.attr for n in ast.walk(value) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "args"}
    if used & reach.required_options:
        return f"{keyword}={ast.unparse(value)} comes from a required option"
    default = parameter_defaults(qualname).get(keyword)
    if default is None:
        return f"{keyword} has no default in {qualname}"
    try:
        script_value = _evaluate(value, {"args": SimpleNamespace(**reach.option_defaults)})
        function_value = _evaluate(default, {})
    except Exception as error:  # an expression that depends on more than the options
        return f"{keyword}={ast.unparse(value)} is not a command-line default ({type(error).__name__}: {error})"
    if _plain(script_value) != _plain(function_value):
        return (f"{keyword}={ast.unparse(value)} is {script_value!r} by default, "
                f"{qualname} defaults to {function_value!r}")
    return None


def call_problems(qualname: str, call: ast.Call, notebook: Source, site: CallSite, reach: ScriptReach,
                  omissible: set[str] | None) -> list[str]:
    """How a notebook call differs from a script call site (``omissible`` None: any defaulted keyword)."""
    problems = []
    name = qualname.rpartition(".")[2]
    starred = any(isinstance(a, ast.Starred) for a in call.args + site.call.args)
    if not starred and len(call.args) != len(site.call.args):
        problems.append(f"{name} gets {len(call.args)} positional argument(s), the script passes "
                        f"{len(site.call.args)} in {site.where}")
    ours = {k.arg for k in call.keywords if k.arg}
    theirs = {k.arg: k.value for k in site.call.keywords if k.arg}
    if extra := sorted(ours - set(theirs)):
        problems.append(f"{name} gets keyword(s) {', '.join(extra)} that the script never passes ({site.where})")
    for keyword in sorted(set(theirs) - ours):
        if omissible is not None and keyword not in omissible:
            problems.append(f"{name} lacks keyword {keyword}: the script passes "
                            f"{keyword}={ast.unparse(theirs[keyword])} in {site.where}")
        elif why := default_mismatch(qualname, keyword, site, reach):
            problems.append(f"{name} lacks keyword {keyword}, which the script does not leave at its default: {why}")
    pairs = [(str(i), a, b) for i, (a, b) in enumerate(zip(call.args, site.call.args))] if not starred else []
    pairs += [(k.arg, k.value, theirs[k.arg]) for k in call.keywords if k.arg in theirs]
    for label, ours_expr, theirs_expr in pairs:
        needed = origins(theirs_expr, site.scope, site.source) - set(SCRIPT_ONLY)
        if missing := sorted(needed - origins(ours_expr, notebook.tree, notebook)):
            argument = f"argument {int(label) + 1}" if label.isdigit() else f"keyword {label}"
            problems.append(f"{name}'s {argument} is built by {', '.join(missing)} in the script "
                            f"({ast.unparse(theirs_expr)} in {site.where}), not in the notebook "
                            f"({ast.unparse(ours_expr)})")
    return problems


@lru_cache(maxsize=None)
def model_keys() -> dict[str, str]:
    """Model key -> its quick config (``configs/<key>_quick.yaml``), read from the configs."""
    keys = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        name = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("name")
        if name:
            keys.setdefault(name, None)
            if path.stem.endswith("_quick"):
                keys[name] = f"configs/{path.name}"
    return keys


def config_problems(notebook: Source, reach: ScriptReach) -> list[str]:
    """A one-model script: the notebook loads that model's quick config and names no other model."""
    model = reach.model_name
    quick = model_keys().get(model)
    if quick is None:
        return [f"no configs/*_quick.yaml has model.name {model!r}, the model of the script"]
    problems = []
    script_text = Path(REPO / reach.script).read_text()
    documented = set(re.findall(r"configs/[\w.-]+\.yaml", script_text))
    if documented and quick not in documented:
        problems.append(f"the script documents {', '.join(sorted(documented))} but not the quick config {quick}")
    loader = "utils.config.experiment.load_experiment_config"
    script_yaml = {s for site in reach.calls.get(loader, []) if site.call.args
                   for s in strings(site.call.args[0], site.scope) if s.endswith(".yaml")}
    loads = [c for c in ast.walk(notebook.tree) if isinstance(c, ast.Call) and qualify(c.func, notebook) == loader]
    loaded = set().union(*(strings(c.args[0], notebook.tree) for c in loads if c.args))
    if loads and not {"configs", Path(quick).name} <= loaded:
        problems.append(f"load_experiment_config does not default to {quick}, the quick config of {model} "
                        f"(it loads {', '.join(sorted(s for s in loaded if s.endswith('.yaml'))) or 'no yaml'})")
    if other := sorted(s for s in loaded if s.endswith(".yaml") and s != Path(quick).name and s not in script_yaml):
        problems.append(f"load_experiment_config loads {', '.join(other)}; the script trains {model}, "
                        f"whose quick config is {quick}")
    named = {n.value for n in ast.walk(notebook.tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    if others := sorted(named & (set(model_keys()) - {model})):
        problems.append(f"the notebook names model {', '.join(others)}; the script is for {model}")
    return problems


def notebook_disagreements(name: str, notebook: dict[str, Any]) -> list[str]:
    """Every way the notebook ``name`` (its JSON, so tests can alter a copy) differs from its script."""
    script = PAIRS.get(name)
    source = notebook_source(name, notebook)
    problems = [f"{source.place(n)} defines {type(n).__name__.removesuffix('Def').lower()} {n.name}; "
                "logic belongs in utils" for n in ast.walk(source.tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Call) and is_work_function(qualname := qualify(node.func, source)):
            calls.setdefault(qualname, []).append(node)
    own = script_reach(script) if script else None
    if own is not None:
        for qualname, sites in sorted(own.calls.items()):
            if qualname in SCRIPT_ONLY or qualname in calls:
                continue
            bare = qualname.rpartition(".")[2]
            elsewhere = sorted(q for q in calls if q.rpartition(".")[2] == bare)
            problems.append(f"the notebook does not call {qualname} (the script calls it in {sites[0].where})"
                            + (f"; the notebook calls {', '.join(elsewhere)}" if elsewhere else ""))
        if own.model_name:
            problems += config_problems(source, own)
    others = [script_reach(s) for s in sorted(set(PAIRS.values())) if s != script]
    for qualname, nb_calls in sorted(calls.items()):
        # its own script's calls, keywords left out only as listed; another script's (an evaluation notebook
        # trains first, as the training scripts do), keywords left out only where they are at their default
        candidates = [(own, site, KEYWORDS_LEFT_AT_DEFAULT.get(qualname, set()))
                      for site in (own.calls.get(qualname, []) if own is not None else [])]
        shared = {id(site.call) for _, site, _ in candidates}  # both training scripts share one call site
        candidates += [(reach, site, None) for reach in others for site in reach.calls.get(qualname, [])
                       if id(site.call) not in shared]
        for call in nb_calls if candidates else []:
            found = [(reach, call_problems(qualname, call, source, site, reach, omissible))
                     for reach, site, omissible in candidates]
            if all(p for _, p in found):
                reach, closest = min(found, key=lambda item: len(item[1]))
                prefix = "" if reach is own else f"(as {reach.script} calls it) "
                problems += [f"{source.place(call)}: {prefix}{p}" for p in closest]
    against = f" and {script}" if script else ""
    return [f"notebooks/{name}{against} disagree: {p}" for p in dict.fromkeys(problems)]


@lru_cache(maxsize=None)
def _read_notebook(name: str) -> dict[str, Any]:
    return json.loads((NOTEBOOKS / name).read_text())


def read_notebook(name: str) -> dict[str, Any]:
    """The notebook's JSON (read as JSON: nbformat's schema validator takes seconds to import)."""
    return copy.deepcopy(_read_notebook(name))


def edited(name: str, old: str, new: str) -> dict[str, Any]:
    """An in-memory copy of a notebook with ``old`` replaced by ``new`` in its one code cell holding it."""
    notebook = read_notebook(name)
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and old in cell_text(c)]
    assert len(cells) == 1, f"{old!r} should be in exactly one code cell of {name}"
    cells[0]["source"] = cell_text(cells[0]).replace(old, new)
    return notebook


# --- the notebooks as committed ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_agrees_with_its_script(name):
    assert notebook_disagreements(name, read_notebook(name)) == []


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_uses_the_project_kernel(name):
    assert read_notebook(name)["metadata"].get("kernelspec") == KERNELSPEC, \
        f"notebooks/{name}: kernelspec must be {KERNELSPEC} (the kernel `make lab` registers)"


def test_every_pair_exists_and_reaches_work_functions():
    for notebook, script in PAIRS.items():
        assert (NOTEBOOKS / notebook).is_file() and (REPO / script).is_file(), (notebook, script)
        assert set(script_reach(script).calls) - set(SCRIPT_ONLY), f"{script} reaches no utils work function"


def test_the_scripts_reach_the_expected_work_functions():
    """A check of the AST walk itself: the scripts' known entry points are found, through the commands."""
    expected = {
        "scripts/train_3d_unet.py": {"utils.training.engine.train", "utils.config.experiment.load_experiment_config"},
        "scripts/train_unetr.py": {"utils.training.engine.train", "utils.config.experiment.load_experiment_config"},
        "scripts/eval_unet.py": {"utils.evaluation.run.evaluate_run"},
        "scripts/eval_unetr.py": {"utils.evaluation.run.evaluate_run"},
        "scripts/compare_models.py": {"utils.evaluation.report.write_comparison_report"},
        "scripts/make_synthetic_data.py": {"utils.synthetic.dataset.generate_dataset"},
    }
    for script, functions in expected.items():
        assert functions <= set(script_reach(script).calls), f"{script}: {sorted(script_reach(script).calls)}"
    assert script_reach("scripts/train_unetr.py").model_name == "unetr2d"
    assert script_reach("scripts/eval_unet.py").model_name == "resunet3d"


def test_exemptions_are_still_reached_by_a_script():
    reached = set().union(*(script_reach(s).calls for s in PAIRS.values()))
    assert set(SCRIPT_ONLY) <= reached
    assert set(KEYWORDS_LEFT_AT_DEFAULT) <= reached


def test_keywords_left_at_default_are_the_functions_defaults():
    for qualname, keywords in KEYWORDS_LEFT_AT_DEFAULT.items():
        for keyword in keywords:
            sites = [(s, r) for r in map(script_reach, sorted(set(PAIRS.values())))
                     for s in r.calls.get(qualname, []) if any(k.arg == keyword for k in s.call.keywords)]
            assert sites, f"no script passes {keyword} to {qualname}; drop it from KEYWORDS_LEFT_AT_DEFAULT"
            for site, reach in sites:
                assert default_mismatch(qualname, keyword, site, reach) is None, (reach.script, qualname, keyword)


# --- the checker fails on a disagreement --------------------------------------------------------

def _only(problems: list[str], notebook: str, script: str, *parts: str) -> None:
    assert problems, "the disagreement was not found"
    assert any(all(part in p for part in parts) for p in problems), problems
    assert all(f"notebooks/{notebook}" in p and script in p for p in problems), problems


def test_calling_another_function_is_reported():
    notebook = edited("eval_unetr.ipynb", "result = evaluate_run(run,", "result = find_latest_run(run,")
    _only(notebook_disagreements("eval_unetr.ipynb", notebook), "eval_unetr.ipynb", "scripts/eval_unetr.py",
          "does not call utils.evaluation.run.evaluate_run", "utils.cli.evaluate.run_evaluation_command")


def test_the_same_name_from_another_module_is_reported():
    notebook = edited("train_3d_unet.ipynb", "from utils.training.engine import train",
                      "from utils.training.search import train")
    _only(notebook_disagreements("train_3d_unet.ipynb", notebook), "train_3d_unet.ipynb",
          "scripts/train_3d_unet.py", "does not call utils.training.engine.train",
          "the notebook calls utils.training.search.train")


def test_a_dropped_keyword_is_reported():
    notebook = edited("train_unetr.ipynb", "train(config, data_dir=DATA_DIR, resume=RESUME)",
                      "train(config, data_dir=DATA_DIR)")
    _only(notebook_disagreements("train_unetr.ipynb", notebook), "train_unetr.ipynb", "scripts/train_unetr.py",
          "train lacks keyword resume", "resume=args.resume")


def test_a_keyword_the_script_never_passes_is_reported():
    notebook = edited("compare_models.ipynb", "n_resamples=BOOTSTRAP)", "n_resamples=BOOTSTRAP, seed=1, alpha=0.1)")
    _only(notebook_disagreements("compare_models.ipynb", notebook), "compare_models.ipynb",
          "scripts/compare_models.py", "write_comparison_report gets keyword(s) alpha that the script never passes")


def test_an_argument_built_another_way_is_reported():
    notebook = edited("synthetic_data.ipynb", "options=SyntheticOptions(matrix=MATRIX)", "options=None")
    _only(notebook_disagreements("synthetic_data.ipynb", notebook), "synthetic_data.ipynb",
          "scripts/make_synthetic_data.py", "generate_dataset's keyword options is built by "
          "utils.synthetic.dataset.SyntheticOptions", "(None)")


def test_a_config_not_from_load_experiment_config_is_reported():
    notebook = edited("train_3d_unet.ipynb", "result = train(config,", "result = train(RESUME,")
    _only(notebook_disagreements("train_3d_unet.ipynb", notebook), "train_3d_unet.ipynb",
          "scripts/train_3d_unet.py", "train's argument 1 is built by utils.config.experiment.load_experiment_config")


def test_another_models_config_is_reported():
    notebook = edited("train_3d_unet.ipynb", '"resunet3d_quick.yaml"', '"unetr2d_quick.yaml"')
    problems = notebook_disagreements("train_3d_unet.ipynb", notebook)
    _only(problems, "train_3d_unet.ipynb", "scripts/train_3d_unet.py",
          "does not default to configs/resunet3d_quick.yaml", "(it loads config.yaml, unetr2d_quick.yaml)")
    _only(problems, "train_3d_unet.ipynb", "scripts/train_3d_unet.py", "loads unetr2d_quick.yaml; the script "
          "trains resunet3d, whose quick config is configs/resunet3d_quick.yaml")
    notebook = edited("train_unetr.ipynb", '"unetr2d_quick.yaml"', '"unetr2d.yaml"')
    _only(notebook_disagreements("train_unetr.ipynb", notebook), "train_unetr.ipynb", "scripts/train_unetr.py",
          "does not default to configs/unetr2d_quick.yaml")


def test_another_models_runs_are_reported():
    notebook = edited("eval_unet.ipynb", 'find_latest_run(CHECKPOINTS_DIR, "resunet3d")',
                      'find_latest_run(CHECKPOINTS_DIR, "unetr2d")')
    _only(notebook_disagreements("eval_unet.ipynb", notebook), "eval_unet.ipynb", "scripts/eval_unet.py",
          "names model unetr2d; the script is for resunet3d")


def test_a_training_fallback_unlike_the_training_script_is_reported():
    notebook = edited("eval_unet.ipynb", ", overrides), data_dir=DATA_DIR)", ", overrides), DATA_DIR)")
    _only(notebook_disagreements("eval_unet.ipynb", notebook), "eval_unet.ipynb", "scripts/eval_unet.py",
          "(as scripts/train_", "train gets 2 positional argument(s), the script passes 1")


def test_a_definition_in_a_notebook_is_reported():
    notebook = edited("synthetic_data.ipynb", "SEED = 0", "SEED = 0\ndef seed():\n    return 0")
    _only(notebook_disagreements("synthetic_data.ipynb", notebook), "synthetic_data.ipynb",
          "scripts/make_synthetic_data.py", "cell 4 defines function seed", "logic belongs in utils")
