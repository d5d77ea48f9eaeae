"""The package's shape, read from its source: imports at any level (inside functions too) form no cycle, no library
module imports a command-line front end, and the simulation core and the methods' math import no Ray."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dice_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()
# The command-line front ends, ``dice_ray/cli/``: they parse arguments, call the library and print. Only front ends
# import them (the ``dice-ray`` console command dispatches to the others).
FRONT_ENDS = {name for name in MODULES if name.startswith("dice_ray.cli")} | {
    "dice_ray.simulate", "dice_ray.analyze", "dice_ray.sweep.__main__", "dice_ray.__main__"}  # the ``python -m`` names


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (imports for annotations only, which never
    run)."""
    skipped = {id(inner) for node in ast.walk(tree)
               if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
               for child in node.body for inner in ast.walk(child)}
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(the package's modules ``path`` imports when it runs, at any level; the top-level names of every module it
    imports)."""
    inner, outer = set(), set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            outer.add(node.module.split(".")[0])
            if node.module.startswith("dice_ray"):
                inner |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                          for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                outer.add(alias.name.split(".")[0])
                if alias.name.startswith("dice_ray"):
                    inner.add(alias.name)
    return {m for m in inner if m in MODULES}, outer


GRAPH = {name: _imports(path)[0] - {name} for name, path in MODULES.items()}


def test_imports_at_any_level_form_no_cycle() -> None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [node])


def test_no_library_module_imports_a_front_end() -> None:
    assert FRONT_ENDS <= set(MODULES), FRONT_ENDS - set(MODULES)
    offenders = {name: sorted(targets & FRONT_ENDS) for name, targets in GRAPH.items()
                 if name not in FRONT_ENDS and targets & FRONT_ENDS}
    assert not offenders, offenders


def test_the_core_the_data_and_the_methods_import_no_ray() -> None:
    """Ray lives in ``engine`` (the engines and the task backend): the methods' hooks and stages run anywhere."""
    layers = ("dice_ray.core", "dice_ray.methods", "dice_ray.data")
    offenders = [name for name, path in MODULES.items() if name.startswith(layers) and "ray" in _imports(path)[1]]
    assert not offenders, offenders


def test_a_planted_cycle_inside_a_function_is_found(tmp_path: Path) -> None:
    """The reader sees imports inside functions (the old check read module-level ones only)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dice_ray.api import run\n    import dice_ray.runner\n")
    assert _imports(source)[0] == {"dice_ray.api", "dice_ray.runner"}


def test_importing_the_math_the_methods_and_the_reports_starts_no_ray() -> None:
    """Read at run time, not from the source: a module that imports no Ray itself may load it through another (a
    package's ``__init__`` too; ``methods/retraining.py`` runs whole schedules on ``engine/local.py``, whose package
    once imported the Ray engine). Ray is imported by the engines that place work on it, when they are used."""
    import subprocess
    import sys

    layers = ("dice_ray.core", "dice_ray.data", "dice_ray.methods", "dice_ray.reports")
    names = sorted(n for n in MODULES if n.startswith(layers)) + ["dice_ray.engine.local", "dice_ray.experiment"]
    probe = f"import importlib, sys\nfor n in {names!r}:\n    importlib.import_module(n)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout


def test_no_module_imports_another_modules_private_name() -> None:
    """A leading underscore means "this module's own": no ``from dice_ray.x import _name``, at any level."""
    offenders = [f"{name}: from {node.module} import {alias.name}" for name, path in MODULES.items()
                 for node in _runtime_nodes(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dice_ray")
                 for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not offenders, offenders


def test_the_lowest_pins_are_the_declared_lower_bounds() -> None:
    """``.ci/lowest`` installs ``.ci/lowest.txt``: every lower bound pyproject.toml declares (the project's and its
    tracking, notebook and test extras') is pinned there at that release, so the bound is the one checked. At the old
    bounds every run failed (scipy 1.10 has no eye_array) and nothing said so."""
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    sections = re.findall(r"^(dependencies|test|notebook|tracking) = \[(.*?)^\]", text, re.S | re.M)
    bounds = {name.lower(): floor for _, body in sections
              for name, floor in re.findall(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)', body, re.M)}
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9.]+)$", (root / ".ci" / "lowest.txt").read_text(),
                           re.M))
    pins = {name.lower(): version for name, version in pins.items()}
    unpinned = {"torch", "torchvision"}  # this machine's pip serves one release of each
    forced = {"pydantic": "2.12.0"}  # ray[tune] 2.55, the lowest Ray, asks for pydantic 2.12 or later
    assert len(bounds) > 20
    for name, floor in bounds.items():
        if name in unpinned:
            continue
        expected = forced.get(name, floor)
        assert pins.get(name) is not None and [int(v) for v in pins[name].split(".")][:len(expected.split("."))] == [
            int(v) for v in expected.split(".")], f"{name}>={floor} in pyproject.toml, {pins.get(name)} in lowest.txt"
