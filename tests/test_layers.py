"""The import graph of peftkit/: the layer order along the data flow, and no cycle.

Every import counts: top level, inside functions, under ``if TYPE_CHECKING`` (read with ast
from every file, so an import hidden in a function body cannot slip through).
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import warnings

import pytest
from conftest import ROOT

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = [
    ("core", {"peftkit", "errors", "config", "io", "log", "arch", "hardware", "provenance", "assets"}),
    ("step", {"step"}),
    ("strategies", {"strategies"}),
    ("tasks", {"tasks"}),
    ("recipe", {"recipe"}),
    ("model", {"model"}),
    ("estimate", {"estimate"}),
    ("training", {"training"}),
    ("report", {"report"}),
    ("export", {"export"}),
    ("runs", {"runs"}),
    ("api/cli", {"api", "cli", "__main__"}),
]
# Imports against the order that are still in the code: (importer, imported) -> why it is left.
# Remove an entry when its import goes (a stale entry is reported as a warning, not a failure, so that
# the branch removing the import merges cleanly with this list).
KNOWN: dict[tuple[str, str], str] = {}  # (importer, imported) -> why it is allowed for now


def module_names() -> dict[str, object]:
    pkg = ROOT / "peftkit"
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path, modules: dict) -> set[str]:
    """peftkit modules ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join((package[: len(package) - node.level + 1] if node.level else [])
                            + ([node.module] if node.module else []))
            # `from . import tasks` imports the module peftkit.tasks; `from .x import f` imports peftkit.x
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = subs or [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]  # peftkit.tasks.base.Task -> peftkit.tasks.base
            if t and t != name:
                found.add(t)
    return found


def layer(module: str) -> int:
    """Index in LAYERS of a peftkit module (by its top-level module or package under peftkit)."""
    top = module.split(".")[1] if "." in module else module
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise KeyError(module)


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def violations(g: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, deps in g.items() for b in deps if layer(b) > layer(a)}


def test_every_module_has_a_layer():
    unplaced = [m for m in module_names() if not any(m.split(".")[1:2] == [t] or m == t
                                                     for _, members in LAYERS for t in members)]
    assert not unplaced, f"modules outside the layer order (add their package to LAYERS): {unplaced}"


def test_no_module_imports_a_layer_above_it():
    found = violations(graph())
    new = sorted(found - set(KNOWN))
    names = [n for n, _ in LAYERS]
    assert not new, "imports against the layer order " + " < ".join(names) + ":\n" + "\n".join(
        f"  {a} ({names[layer(a)]}) imports {b} ({names[layer(b)]})" for a, b in new)
    if gone := sorted(set(KNOWN) - found):
        warnings.warn(f"tests/test_layers.py KNOWN lists imports that are gone (remove them): {gone}", stacklevel=1)


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    modules = module_names()
    assert {"peftkit.training.rundir", "peftkit.export.merge", "peftkit.export.predict", "peftkit.tasks.base"} <= set(modules)
    for name in modules:
        if name != "peftkit.__main__":
            importlib.import_module(name)
    g = graph()
    assert "peftkit.training.rundir" in g["peftkit.export.merge"] and "peftkit.training.rundir" in g["peftkit.export.predict"]
    try:
        list(graphlib.TopologicalSorter(g).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_checks_see_imports_inside_functions_and_upward_ones(tmp_path):
    # The export <-> predict cycle of old was hidden in function bodies: the parser must see those.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .export import load_trained\n    from . import tasks\n")
    mods = {"peftkit.m": f, "peftkit.export": None, "peftkit.tasks": None, "peftkit": None}
    assert imports("peftkit.m", f, mods) == {"peftkit.export", "peftkit.tasks"}
    # A strategy reaching up into the trainer from a function body, and a runs module into the CLI.
    g = {"peftkit.strategies.x": {"peftkit.training.trainer", "peftkit.arch"},
         "peftkit.runs.y": {"peftkit.cli", "peftkit.export.merge"}}
    assert violations(g) == {("peftkit.strategies.x", "peftkit.training.trainer"), ("peftkit.runs.y", "peftkit.cli")}
