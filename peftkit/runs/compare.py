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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from peftkit import hardware
from peftkit import recipe as R
from peftkit.config import Section
from peftkit.log import warn
from peftkit.errors import RecipeError, UserError
from peftkit.io import atomic_write_json
from peftkit.runs import executors as X
from peftkit.runs.search_space import SearchConfig
from peftkit.runs.spec import RunSpec

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
    # Where the runs execute (CLI flags override it): validated by the named executor's Config
    # (peftkit.runs.executors.REGISTRY) when the comparison is planned.
    executor: dict[str, Any] = {}

    @field_validator("variants")
    @classmethod
    def _unique(cls, v):
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variant name(s): {', '.join(dup)}")
        return v


@dataclass(frozen=True)
class ComparePlan:
    """A compare recipe read and checked once: every run, where they execute; what api, compare
    and search pass down (nothing below reads the file again)."""

    path: Path  # the compare recipe file (messages, compare.json)
    recipe: CompareRecipe
    out: Path
    runs: tuple[RunSpec, ...]
    executor: X.ExecutorConfig  # the recipe's executor: section with the CLI's flags over it

    @property
    def name(self) -> str:
        return self.recipe.name or self.path.parent.name or "compare"

    @property
    def search(self) -> SearchConfig | None:
        return self.recipe.search


def yaml_value(v) -> str:
    """A value as YAML text that parses back to itself (``5.0e-05``, not ``5e-05``)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def dotted_overrides(d: dict) -> list[str]:
    """``{"train.lr": 5e-5}`` as the CLI's override strings ``["train.lr=5.0e-05"]``."""
    return [f"{k}={yaml_value(v)}" for k, v in d.items()]


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


def _runs(path: Path, cr: CompareRecipe, out: Path, overrides: list[str] | None) -> list[RunSpec]:
    """Every (variant, seed) as a validated recipe; all errors found before anything runs."""
    files: dict[str, dict] = {}  # each base/variant file read once

    def source(rel: str | dict | None, what: str) -> dict:
        if isinstance(rel, dict):
            return rel
        if rel is None:
            raise RecipeError(f"{path}: {what}: needs a 'recipe' file or a top-level 'base'")
        if rel not in files:
            files[rel] = R.read_yaml(path.parent / rel)
        return files[rel]

    runs, first = [], {}
    for v in cr.variants:
        base = source(v.recipe if v.recipe is not None else cr.base, f"variant '{v.name}'")
        for seed in cr.seeds:
            ovr = dotted_overrides(cr.set) + dotted_overrides(v.set) + (overrides or []) + [f"train.seed={seed}"]
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
            runs.append(RunSpec(v.name, seed, rec, out / v.name / f"seed{seed}", requested))
    return runs


def prepare(path: str | Path, out: str | Path, overrides: list[str] | None = None, *,
            executor: dict | None = None, timeout: float | None = None) -> ComparePlan:
    """The compare recipe read once: its runs and its executor (``executor``: CLI flags over the recipe's
    ``executor:`` section, None values ignored; ``timeout``: seconds per run). Every error before any run."""
    path, out = Path(path), Path(out)
    if out.exists() and not out.is_dir():  # before anything is planned or written
        raise UserError(f"--out {out}: exists and is not a directory")
    cr = load(path)
    try:
        X.config(cr.executor)  # the recipe's own section, named as the recipe's mistake
    except UserError as e:
        raise RecipeError(f"{path}: {e}") from None
    flags = {**(executor or {}), **({"timeout_s": timeout} if timeout is not None else {})}
    runs = tuple(_runs(path, cr, out, overrides))
    for why in filter(None, (r.unreadable_result() for r in runs)):
        warn(f"{why}; this run is trained again")
    return ComparePlan(path, cr, out, runs, X.resolve(cr.executor, flags))


def plan(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> list[RunSpec]:
    """Every (variant, seed) of a compare recipe as a validated run (see :func:`prepare`)."""
    return list(prepare(path, out, overrides).runs)


def record_runs(plan: ComparePlan, runs: list[RunSpec], outcomes=None) -> None:
    out, ex = plan.out, plan.executor
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
        "schema": SCHEMA, "compare_recipe": str(plan.path), "variants": list(dict.fromkeys(r.variant for r in runs)),
        "precision": hardware.resolve(plan.runs[0].requested_precision).record(),
        "executor": ex.model_dump(exclude_defaults=True) | {"name": ex.name, "parallel": ex.parallel}, "runs": rows})


def run(plan: ComparePlan, echo=print) -> int:
    """Train every run of the plan not yet done through its executor, then report; 1 if any failed."""
    pool = X.create(plan.executor)
    plan.out.mkdir(parents=True, exist_ok=True)
    record_runs(plan, list(plan.runs))
    outcomes = pool.run(plan.runs, echo=echo)
    record_runs(plan, list(plan.runs), outcomes)
    from peftkit.runs.reference import run_reference

    # the untrained model, evaluated once: the report's reference row (and forgetting baseline)
    run_reference(list(plan.runs), plan.out, plan.executor.timeout_s, echo)
    echo(X.summary(outcomes, primary_metrics(outcomes)))
    from peftkit.report.summary import report

    report(plan.out, echo=echo)
    failed = sum(o.status == "failed" for o in outcomes)
    if failed:
        echo(f"{failed} of {len(plan.runs)} run(s) failed")
    return 1 if failed else 0


def compare(path: str | Path, out: str | Path, overrides: list[str] | None = None, timeout: float | None = None,
            echo=print, executor: dict | None = None) -> int:
    """:func:`run` of a compare recipe file. ``executor``: options over the recipe's ``executor:`` section
    (CLI flags; None values ignored)."""
    return run(prepare(path, out, overrides, executor=executor, timeout=timeout), echo)


def primary_metrics(outcomes: list[X.Outcome]) -> list[str]:
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
