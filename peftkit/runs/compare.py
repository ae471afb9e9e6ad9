"""Several strategies on the same task, each run in its own process, then one report.

A compare recipe (YAML)::

    name: quickstart
    base: ../quickstart.yaml          # a recipe file (relative to this file) or an inline mapping
    set: {train.max_steps: 120}       # shared by every variant: the common budget
    seeds: [0, 1]
    variants:
      - {name: full, set: {strategy.name: full, train.lr: 5.0e-5}}
      - {name: lora-r16, set: {strategy.name: lora, strategy.r: 16}}
      - {name: ia3, recipe: ia3.yaml}  # a whole recipe file instead of the base

A variant's recipe = (its ``recipe`` file or the base) + the shared ``set`` + its own ``set``
+ ``train.seed``. Every variant must agree on the task, data order, budget and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from peftkit.runs import executors as X
from peftkit import hardware
from peftkit import recipe as R
from peftkit.config import Section
from peftkit.errors import RecipeError
from peftkit.io import atomic_write_json
from peftkit.runs.search_space import SearchConfig

SCHEMA = "peftkit.compare/1"
# Keys every variant must share: same data, same order, same budget, same evaluation.
SHARED = ("task", "train.seed", "train.precision", "train.epochs", "train.max_steps", "train.batch_size",
          "train.grad_accum", "train.group_by_length", "train.eval_split", "train.eval_every")


class Variant(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    recipe: str | None = None
    set: dict[str, Any] = {}


class CompareRecipe(Section):
    name: str | None = None
    base: str | dict | None = None
    set: dict[str, Any] = {}
    seeds: list[int] = Field(default=[0], min_length=1)
    variants: list[Variant] = Field(min_length=1)
    search: SearchConfig | None = None  # per-variant lr (and other keys) chosen on validation
    executor: X.ExecutorSection = X.ExecutorSection()  # where the runs execute (CLI flags override it)

    @field_validator("variants")
    @classmethod
    def _unique(cls, v):
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variant name(s): {', '.join(dup)}")
        return v


def _yaml_value(v) -> str:
    """A value as YAML text that parses back to itself (``5.0e-05``, not ``5e-05``)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def _overrides(d: dict) -> list[str]:
    return [f"{k}={_yaml_value(v)}" for k, v in d.items()]


def _first_diff(a, b, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_diff(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class Run:
    def __init__(self, variant: str, seed: int, recipe: R.Recipe, out: Path, requested_precision: str = "auto"):
        self.variant, self.seed, self.recipe = variant, seed, recipe
        self.requested_precision = requested_precision
        self.dir = out / variant / f"seed{seed}"
        self.hash = recipe.hash()

    def done(self) -> bool:
        try:
            res = json.loads((self.dir / "result.json").read_text())
        except (OSError, ValueError):
            return False
        if res.get("run", {}).get("recipe_hash") != self.hash:
            return False
        # train.stop_at is not hashed (a search rung continues the same run): done = trained that far.
        m, stop = res.get("metrics") or {}, self.recipe.train.stop_at
        if stop is None:
            return "stopped_at" not in m
        return m.get("stopped_at") == self.recipe.train.stop_step(m.get("total_steps") or 0)


def load(path: str | Path) -> CompareRecipe:
    data = R.read_yaml(path)
    try:
        return CompareRecipe.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(f"unknown key '{loc}'" if err["type"] == "extra_forbidden" else f"{loc or 'compare'}: {msg}")
        raise RecipeError(f"{path}: " + "; ".join(msgs)) from None


def plan(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> list[Run]:
    """Every (variant, seed) as a validated recipe; all errors found before anything runs."""
    path, out = Path(path), Path(out)
    cr = load(path)
    here = path.parent

    def source(rel: str | dict | None, what: str) -> dict:
        if isinstance(rel, dict):
            return rel
        if rel is None:
            raise RecipeError(f"{path}: {what}: needs a 'recipe' file or a top-level 'base'")
        return R.read_yaml(here / rel)

    runs, first = [], {}
    for v in cr.variants:
        base = source(v.recipe if v.recipe is not None else cr.base, f"variant '{v.name}'")
        for seed in cr.seeds:
            ovr = _overrides(cr.set) + _overrides(v.set) + (overrides or []) + [f"train.seed={seed}"]
            try:
                rec = R.from_dict(R.apply_overrides(base, ovr), f"{path} variant '{v.name}'")
            except RecipeError as e:
                raise RecipeError(str(e)) from None
            # Precision is part of the shared budget: resolved once (per process) and pinned.
            requested, rec = rec.train.precision, hardware.pin_precision(rec)
            d = rec.to_dict()
            for key in SHARED:
                ref = first.setdefault((seed, key), (v.name, _get(d, key)))
                diff = _first_diff(_get(d, key), ref[1], key)
                if diff:
                    raise RecipeError(
                        f"{path}: variant '{v.name}': {diff[0]}={diff[1]!r} differs from variant '{ref[0]}' "
                        f"({diff[2]!r}); a comparison needs the same data, order, budget and evaluation: "
                        f"set it in the top-level 'set'")
            runs.append(Run(v.name, seed, rec, out, requested))
    return runs


def execute(run: Run, timeout: float | None = None) -> dict | None:
    """Train one run in a fresh process here. None on success, else the error record (also written)."""
    return X.execute(run, timeout)["error"]


def record_runs(out: Path, path, runs: list[Run], ex: X.ExecutorSection, outcomes=None) -> None:
    done = {str(o.dir): o for o in outcomes or []}
    try:  # a skipped run keeps where and how it ran the last time
        before = {x["dir"]: x.get("execution") for x in json.loads((out / "compare.json").read_text())["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        before = {}
    rows = []
    for r in runs:
        row = {"variant": r.variant, "seed": r.seed, "dir": str(r.dir.relative_to(out)), "recipe_hash": r.hash,
               "strategy": r.recipe.strategy.name}
        o = done.get(str(r.dir))
        if o is not None and o.status != "skipped":
            row["execution"] = {"status": o.status, "where": o.where, "seconds": o.seconds, "executor": ex.name}
        elif before.get(row["dir"]):
            row["execution"] = before[row["dir"]]
        rows.append(row)
    atomic_write_json(out / "compare.json", {
        "schema": SCHEMA, "compare_recipe": str(path), "variants": list(dict.fromkeys(r.variant for r in runs)),
        "precision": hardware.resolve(runs[0].requested_precision).record(),
        "executor": ex.model_dump(exclude_defaults=True) | {"name": ex.name, "parallel": ex.parallel}, "runs": rows})


def executor_options(path, timeout: float | None = None, executor: dict | None = None) -> X.ExecutorSection:
    """The recipe's ``executor:`` section with CLI flags (None values ignored) over it."""
    flags = {k: v for k, v in (executor or {}).items() if v is not None}
    flags |= {"timeout_s": timeout} if timeout is not None else {}
    return X.options(**(load(path).executor.model_dump() | flags))


def compare(path: str | Path, out: str | Path, overrides: list[str] | None = None, timeout: float | None = None,
            echo=print, executor: dict | None = None) -> int:
    """``executor``: options over the recipe's ``executor:`` section (CLI flags; None values ignored)."""
    runs = plan(path, out, overrides)
    ex = executor_options(path, timeout, executor)
    pool = X.from_options(**ex.model_dump())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_runs(out, path, runs, ex)
    outcomes = pool.run(runs, echo=echo)
    record_runs(out, path, runs, ex, outcomes)
    from peftkit.runs.reference import run_reference

    run_reference(runs, out, ex.timeout_s, echo)  # the untrained model: the report's reference row, once
    echo(X.summary(outcomes, _metrics(outcomes)))
    from peftkit.report.summary import report

    report(out, echo=echo)
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        echo(f"{failed} of {len(runs)} run(s) failed")
    return 1 if failed else 0


def _metrics(outcomes: list[X.Outcome]) -> list[str]:
    """Each run's primary metric, for the summary table ('' when it has no result)."""
    from peftkit.report.summary import primary

    shown = []
    for o in outcomes:
        try:
            name, value = primary(json.loads((o.dir / "result.json").read_text()))
        except (OSError, ValueError):
            name, value = "", None
        shown.append(f"{name} {value:.4f}" if isinstance(value, float) else "")
    return shown
