"""The run directory: reuse rules for `train --out`, loading a trained run, the import graph."""

from __future__ import annotations

import ast
import graphlib
import importlib

import pytest
import torch
from conftest import ROOT, tiny_recipe

from peftkit.training import checkpoint, rundir
from peftkit import recipe as R
from peftkit.errors import UserError


def recipe_dict(tiny_models, sentiment_dir, **train):
    return tiny_recipe(tiny_models["bert"], sentiment_dir, "lora",
                       **{"max_steps": 14, "checkpoint_every": 3, "log_every": 1, **train})


def test_run_dir_rules(tiny_models, sentiment_dir, tmp_path):
    r = R.from_dict(recipe_dict(tiny_models, sentiment_dir))
    other = R.from_dict(recipe_dict(tiny_models, sentiment_dir, lr=5e-4))
    h = r.hash()
    assert h == R.from_dict(recipe_dict(tiny_models, sentiment_dir, checkpoint_every=7, keep_checkpoints=5)).hash()
    assert rundir.check_run_dir(tmp_path / "new", h, force=False) == "fresh"
    run = tmp_path / "run"
    checkpoint.write(run / "checkpoints", 3, h, {"w": torch.ones(2)}, {"step": 3}, keep=2)
    assert rundir.check_run_dir(run, h, force=False) == "resume"
    with pytest.raises(UserError, match="checkpoints of a different recipe .* --force to discard"):
        rundir.check_run_dir(run, other.hash(), force=False)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        rundir.check_run_dir(run, h, force=False)
    assert rundir.check_run_dir(run, h, force=True) == "resume"  # what compare does
    assert rundir.check_run_dir(run, other.hash(), force=True) == "fresh"
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only peftkit's own files go
    (run / "result.json").write_text("{")
    with pytest.raises(UserError, match="result.json is corrupt"):
        rundir.check_run_dir(run, h, force=False)
    (run / "result.json").write_text("{}")
    with pytest.raises(UserError, match="finished run"):
        rundir.check_run_dir(run, h, force=False)



# -- no import cycle in peftkit/ ---------------------------------------------------------------
def _module_names() -> dict[str, object]:
    pkg = ROOT / "peftkit"
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path, modules: dict) -> set[str]:
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


def test_every_module_imports_and_the_import_graph_has_no_cycle():
    modules = _module_names()
    assert {"peftkit.training.rundir", "peftkit.export.merge", "peftkit.export.predict", "peftkit.tasks.base"} <= set(modules)
    for name in modules:
        if name != "peftkit.__main__":
            importlib.import_module(name)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "peftkit.training.rundir" in graph["peftkit.export.merge"] and "peftkit.training.rundir" in graph["peftkit.export.predict"]
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    # The export <-> predict cycle of old was hidden in function bodies: the parser must see those.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .export import load_trained\n    from . import tasks\n")
    mods = {"peftkit.m": f, "peftkit.export": None, "peftkit.tasks": None, "peftkit": None}
    assert _imports("peftkit.m", f, mods) == {"peftkit.export", "peftkit.tasks"}
