"""The run directory: reuse rules for `train --out`, loading a trained run (the import graph: tests/test_layers.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

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
