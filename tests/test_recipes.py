"""Recipes: every shipped one validates; mistakes give one clear line; overrides are typed."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import ROOT, run_cli
from peftkit import recipe as R
from peftkit.errors import RecipeError

SHIPPED = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts
                 and not p.name.startswith(("compare", "search")))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path):
    r = R.load(path)
    assert r.strategy.name and r.task.kind


def test_shipped_recipes_exist():
    assert ROOT / "recipes" / "quickstart.yaml" in SHIPPED


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expected",
    [
        ("strategy:\n  name: lora\n  rnak: 8\n", "unknown key 'strategy.rnak' (allowed here: name, r, alpha"),
        ("trian:\n  lr: 1\n", "unknown key 'trian'"),
        ("task:\n  kind: classification\n  data:\n    trian: x.csv\n", "unknown key 'task.data.trian'"),
        ("strategy:\n  name: lorra\n", "strategy.name: unknown value 'lorra' (known: full, lora"),
        ("train:\n  lr: fast\n", "train.lr: Input should be a valid number"),
        ("train:\n  batch_size: 0\n", "train.batch_size: Input should be greater than or equal to 1"),
        ("model:\n  quantization: 4bit\nstrategy:\n  name: full\n", "strategy 'full' trains base weights"),
        ("strategy: [1, 2\n", "invalid YAML"),
        ("- a\n- b\n", "a recipe must be a mapping"),
    ],
)
def test_malformed_recipe_one_line(tmp_path, text, expected):
    p = _write(tmp_path, text)
    with pytest.raises(RecipeError) as e:
        R.load(p)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_validate_cli_exit_code_and_single_line(tmp_path):
    p = _write(tmp_path, "strategy:\n  name: lora\n  rnak: 8\n")
    proc = run_cli("validate", str(p))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "strategy.rnak" in lines[0] and "Traceback" not in proc.stderr
    ok = run_cli("validate", str(ROOT / "recipes" / "quickstart.yaml"))
    assert ok.returncode == 0, ok.stderr


def test_missing_recipe_file(tmp_path):
    proc = run_cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_are_typed_and_validated():
    base = R.read_yaml(ROOT / "recipes" / "quickstart.yaml")
    r = R.from_dict(R.apply_overrides(base, ["train.lr=3e-4", "strategy.r=16", "train.max_steps=20"]))
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.strategy.r == 16 and r.train.max_steps == 20
    with pytest.raises(RecipeError, match="train.max_steps"):
        R.from_dict(R.apply_overrides(base, ["train.max_steps=many"]))
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        R.apply_overrides(base, ["train.lr"])


def test_switching_strategy_drops_keys_of_the_old_one():
    base = R.read_yaml(ROOT / "recipes" / "quickstart.yaml")
    r = R.from_dict(R.apply_overrides(base, ["strategy.name=full"]))
    assert r.strategy.name == "full"
    assert r.model.quantization == "none"
    q = R.from_dict(R.apply_overrides(base, ["strategy.name=qlora"]))
    assert q.model.quantization == "4bit" and q.strategy.r == 8  # lora keys carry over to qlora


def test_recipe_is_frozen_and_hash_ignores_output():
    r = R.from_dict({})
    with pytest.raises(ValidationError):
        r.train.lr = 1.0  # type: ignore[misc]
    a = R.from_dict({"output": {"dir": "a"}})
    b = R.from_dict({"output": {"dir": "b"}})
    c = R.from_dict({"train": {"seed": 1}})
    assert a.hash() == b.hash() != c.hash()


def test_print_config_shows_resolved_recipe():
    proc = run_cli("train", str(ROOT / "recipes" / "quickstart.yaml"), "strategy.name=qlora", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    resolved = R.from_dict(__import__("yaml").safe_load(proc.stdout))
    assert resolved.strategy.name == "qlora" and resolved.model.quantization == "4bit"


def test_validate_cli_accepts_every_shipped_file():
    """Recipes, compare recipes (every variant × seed) and accelerate configs (skipped)."""
    files = sorted(str(p) for p in (ROOT / "recipes").rglob("*.yaml"))
    proc = run_cli("validate", *files)
    assert proc.returncode == 0, proc.stderr
    assert "compare: 8 runs" in proc.stdout and "skip" in proc.stdout
