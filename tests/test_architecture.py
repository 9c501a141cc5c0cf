"""The package's shape: stage subpackages whose imports run one way, in the order the README's map gives.

The stage order is not kept here by hand: it is derived from the folders under ``utils/`` and
the imports between them. A stage may import only from stages that it does not feed, so the
stage-level import graph must have no cycle; the README's folder map must list every stage in
an order that respects it (each stage after every stage it imports from).
"""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UTILS = REPO / "utils"
MAX_MODULES_PER_STAGE = 12


def _stages() -> list[str]:
    return sorted(p.name for p in UTILS.iterdir() if (p / "__init__.py").is_file())


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _utils_imports(path: Path) -> set[str]:
    """Dotted ``utils`` modules that ``path`` imports (``from utils.x import y`` counts ``utils.x.y`` if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*candidate.split("."))).with_suffix(".py").is_file()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "utils"}
    return found


def _module_graph() -> dict[str, set[str]]:
    return {_module_name(p): _utils_imports(p) for p in UTILS.rglob("*.py")}


def _stage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {stage: set() for stage in _stages()}
    for module, imports in _module_graph().items():
        stage = module.split(".")[1] if module.count(".") else None
        if stage is None:
            continue
        graph[stage] |= {name.split(".")[1] for name in imports if name.count(".") and name.split(".")[1] != stage}
    return graph


def test_utils_holds_only_stage_packages():
    loose = sorted(p.name for p in UTILS.glob("*.py") if p.name != "__init__.py")
    assert loose == [], "place modules in a stage subpackage"
    assert _stages(), "no stage packages found"
    for stage in _stages():
        modules = [p for p in (UTILS / stage).glob("*.py") if p.name != "__init__.py"]
        assert 0 < len(modules) <= MAX_MODULES_PER_STAGE, f"utils/{stage} holds {len(modules)} modules"
        assert not list((UTILS / stage).glob("*/__init__.py")), f"utils/{stage}: stages are one level deep"


def test_no_module_import_cycle():
    graph = _module_graph()
    try:
        list(TopologicalSorter({m: {i for i in imports if i in graph} for m, imports in graph.items()}).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle between modules: {error.args[1]}") from None


def test_stages_import_one_way():
    try:
        list(TopologicalSorter(_stage_graph()).static_order())
    except CycleError as error:
        raise AssertionError(f"stages import each other in a cycle: {' -> '.join(error.args[1])}") from None


def _readme_stage_order() -> list[str]:
    readme = REPO.joinpath("README.md").read_text()
    section = readme.split("<!-- stage-map:begin -->")[1].split("<!-- stage-map:end -->")[0]
    return re.findall(r"^\| `utils/(\w+)/` \|", section, flags=re.M)


def test_readme_map_lists_the_stages_in_data_flow_order():
    order = _readme_stage_order()
    assert sorted(order) == _stages(), "the README's map must list every stage folder exactly once"
    position = {stage: index for index, stage in enumerate(order)}
    offences = [f"utils/{stage} imports utils/{used}, listed after it"
                for stage, uses in _stage_graph().items() for used in uses if position[used] > position[stage]]
    assert offences == []


def test_the_checks_catch_an_upward_import():
    """A stage importing a later one breaks the README order; a mutual import is a cycle."""
    graph = _stage_graph()
    order = _readme_stage_order()
    first, last = order[0], order[-1]
    graph[first] = graph[first] | {last}
    position = {stage: index for index, stage in enumerate(order)}
    assert any(position[used] > position[stage] for stage, uses in graph.items() for used in uses)
    graph[last] = graph[last] | {first}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError:
        return
    raise AssertionError("a cycle between the first and last stages went unnoticed")
