"""Each strategy at its own best setting: a grid searched on VALIDATION by successive halving.

A compare recipe with a ``search:`` section::

    search:
      lr: {low: 1.0e-4, high: 1.0e-2, points: 4}   # or a list; omitted = the strategy's default grid
      grid: {strategy.r: [8, 16]}                    # other keys, optional (crossed with lr)
      eta: 2                                         # keep the best 1/eta at each rung
      variants:                                      # per variant, replaces the shared space
        full: {lr: [2.0e-5, 5.0e-5, 1.0e-4]}

How it runs (first seed of the comparison; all state is in run directories):

* every grid point is a trial ``DIR/<variant>/search/<setting>/seed<s>/``, an ordinary run
  dir of the variant's recipe with that setting. Rung k trains it up to a fraction of the
  budget (``train.stop_at``, not part of the recipe hash: the learning-rate schedule stays
  that of the whole budget), saves a checkpoint and evaluates the validation split only;
  the rung's result is kept as ``rung<k>.json``. The best 1/eta (on validation) resume
  their checkpoint at the next rung: no step is trained twice. With 4 points and eta 2:
  4 x 1/4 + 2 x 1/4 + 1 x 1/2 = 2 budgets.
* the one survivor continues to the full budget in ``DIR/<variant>/seed<s>/`` from its
  checkpoint (hard-linked), and the other seeds train the selected setting from scratch
  there: the test split is evaluated only for the selected setting, once per seed.
* re-running skips finished rungs and runs; a killed search resumes its checkpoints; a
  failed trial is recorded (``error.json``) and drops out of the search.

Why not Optuna's GridSampler + SuccessiveHalvingPruner: that pruner is asynchronous (ASHA).
Run one trial at a time, the first trial is never pruned and each new best goes straight
to the full budget, so the cost depends on the grid order and is not bounded by ~2x. The
synchronous rungs here are a few lines, deterministic, and keep all state in the run dirs
(no study database to keep in step with them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peftkit import recipe as R
from peftkit.errors import RecipeError
from peftkit.io import atomic_write_json
from peftkit.runs import compare as C
from peftkit.runs import executors as X
from peftkit.runs.search_space import (
    LOWER_IS_BETTER,
    LogGrid,
    SearchConfig,
    Space,
    beyond_edge,
    cost,
    point_label,
    points,
    rungs,
)
from peftkit.runs.spec import RunSpec
from peftkit.runs.trials import TrialBatch, groups

SCHEMA = "peftkit.search/1"


def better(metric: str) -> int:
    return -1 if metric in LOWER_IS_BETTER else 1


def link_checkpoints(src: Path, dst: Path) -> None:
    """Give ``dst`` the trial's checkpoints (hard links: files are never rewritten in place) and
    a copy of its log (appended to on resume)."""
    from peftkit.training.checkpoint import DIR
    from peftkit.training.rundir import start_over

    if dst.exists():
        start_over(dst)
    dst.mkdir(parents=True, exist_ok=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src / DIR, dst / DIR, copy_function=link)
    if (src / "log.jsonl").exists():
        shutil.copy2(src / "log.jsonl", dst / "log.jsonl")
    if (src / "recipe.yaml").exists():
        shutil.copy2(src / "recipe.yaml", dst / "recipe.yaml")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(out: Path, state: dict) -> None:
    atomic_write_json(out / "search.json", {"schema": SCHEMA, **state})


# -- the driver ---------------------------------------------------------------------------
class Trial:
    """One grid point of one variant (first seed): an ordinary run dir, trained rung by rung."""

    def __init__(self, base: RunSpec, point: dict, out: Path):
        self.base, self.point, self.label = base, point, point_label(point)
        where = f"search point {self.label} of variant '{base.variant}'"
        self.recipe = R.from_dict(R.apply_overrides(base.recipe.to_dict(), C.dotted_overrides(point)), where)
        self.hash = self.recipe.hash()
        self.out = out
        self.dir = out / base.variant / "search" / self.label / f"seed{base.seed}"
        self.error: str | None = None

    def run(self, frac: float) -> RunSpec:
        """This grid point trained up to ``frac`` of the budget, in its own run dir."""
        rec = R.from_dict(R.apply_overrides(self.recipe.to_dict(), [f"train.stop_at={frac!r}"]))
        return self.base.with_recipe(rec, self.dir)

    def rung_file(self, frac: float) -> Path:
        return self.dir / f"rung-{frac:g}.json"

    def result(self, frac: float) -> dict | None:
        """The rung's validation result: its rung file, or the run's result.json of that rung (a search
        killed between the run's end and the copy)."""
        for f in (self.rung_file(frac), self.dir / "result.json"):
            r = read_json(f)
            m = (r or {}).get("metrics", {})
            if (r and r.get("run", {}).get("recipe_hash") == self.hash and m.get("stopped_at")
                    and m["stopped_at"] == self.run(frac).recipe.train.stop_step(m["total_steps"])):
                if f.name == "result.json":
                    atomic_write_json(self.rung_file(frac), r)
                return r
        return None

    def score(self, frac: float) -> float | None:
        """The rung's primary validation metric (what the report shows)."""
        from peftkit.report.summary import primary

        r = self.result(frac)
        return primary(r)[1] if r else None

    def loss(self, frac: float) -> float | None:
        """The rung's mean validation loss (classification: cross-entropy), where the task has one."""
        return ((self.result(frac) or {}).get("metrics", {}).get("eval") or {}).get("loss")

    def rank_key(self, frac: float, metric: str) -> tuple:
        """Sort key, best first: by the loss (``metric`` "loss", where there is one), else by the primary
        metric with ties broken by the loss; a stable sort keeps grid order for what is left."""
        loss, score = self.loss(frac), self.score(frac)
        if metric == "loss" and loss is not None:
            return (loss,)
        sign = better(primary_name(self.result(frac)))
        return (-sign * score, loss if loss is not None else 0.0)

    def ranked_by(self, frac: float, metric: str) -> str:
        return "loss" if metric == "loss" and self.loss(frac) is not None else primary_name(self.result(frac))


def _run_all(runs: list, pool, echo=print) -> list[dict | None]:
    """Train jobs (runs or trial batches) through the compare's executor; per job None or its error record."""
    return [o.error if o.status == "failed" else None for o in pool.run(runs, echo=echo)]


def _train_trials(runs: list, pool, ex, folder: Path, title: str, echo) -> list[dict | None]:
    """A rung's trial runs, in ``executor.parallel`` batches of one process each (peftkit.runs.trial_batch);
    the trials a dead batch left without a record again, a process each. Per run None or its error."""
    if not runs:
        return []
    if ex.launcher != "none":  # a trial over several processes (torchrun/accelerate): one run at a time
        return _run_all(runs, pool, echo)
    parts = groups(runs, ex.parallel)
    batches = [TrialBatch(g, folder / f"batch{i + 1}", f"{title}, {len(g)} trial(s) in one process"
                          + (f" (batch {i + 1}/{len(parts)})" if len(parts) > 1 else "")) for i, g in enumerate(parts)]
    _run_all(batches, pool, echo)
    errs: list[dict | None] = [None] * len(runs)
    again = []
    for i, r in enumerate(runs):
        if not r.done():
            errs[i] = read_json(r.dir / "error.json")
            if errs[i] is None:  # the batch died before this trial wrote a record
                again.append(i)
    if again:
        echo(f"[search] {len(again)} trial(s) left without a result by their batch: again, a process each")
        for i, e in zip(again, _run_all([runs[i] for i in again], pool, echo)):
            errs[i] = e
    return errs


def _train_rung(todo: list[tuple[Trial, float]], title: str, name: str, pool, ex, echo) -> None:
    """Train the rung's trials (batches under ``DIR/_search/<name>``); a failed one is recorded and drops out."""
    runs = [t.run(frac) for t, frac in todo]
    folder = todo[0][0].out / "_search" / name if todo else None
    for (t, frac), err in zip(todo, _train_trials(runs, pool, ex, folder, title, echo)):
        if err is None:
            atomic_write_json(t.rung_file(frac), read_json(t.dir / "result.json"))
        else:
            t.error = err["message"]
            echo(f"[search] {t.base.variant} {t.label}: FAILED ({t.error}); details in {t.dir / 'error.json'}")


def _extend(trials: dict[str, list[Trial]], every: dict, plans: dict, times: int, pool, ex, metric: str,
            echo) -> None:
    """SearchConfig.extend: while a variant's best first-rung lr is on its grid's edge, a point beyond."""
    frac = {v: p[0][1] for v, p in plans.items() if p}
    for n in range(times):
        todo, added = [], False
        for v, alive in trials.items():
            f = frac.get(v)
            scored = [t for t in alive if f is not None and t.score(f) is not None]
            if not scored:
                continue
            best = min(scored, key=lambda t: t.rank_key(f, metric))  # min: the first best, as sorted() in _rung
            lr = beyond_edge([t.point["train.lr"] for t in every[v]], best.point["train.lr"])
            if lr is None:
                continue
            t = Trial(best.base, {**best.point, "train.lr": lr}, best.out)
            if any(o.label == t.label for o in every[v]):
                continue
            echo(f"[search] {v}: the best lr after rung 1, {best.point['train.lr']:g}, is on the grid's edge: "
                 f"adding {lr:g} (+{f:.0%} of a budget)")
            alive.append(t)
            every[v].append(t)
            added = True
            if t.result(f) is None:
                todo.append((t, f))
        if not added:
            return
        _train_rung(todo, f"search rung 1, grid edge {n + 1}", f"rung1-edge{n + 1}", pool, ex, echo)


def _rung(trials: dict[str, list[Trial]], k: int, plans: dict, pool, echo, ex=None, progress=None,
          metric: str = "loss", extend: int = 0, every: dict | None = None) -> None:
    """Rung ``k`` of every variant that has one, in one batch; at rung 1, ``extend`` (SearchConfig) grid
    edges; then keep the best of each (``metric``: SearchConfig.metric)."""
    ex = ex or X.config()
    todo = []
    for v, alive in trials.items():
        if k < len(plans[v]):
            frac = plans[v][k][1]
            todo += [(t, frac) for t in alive if t.result(frac) is None and t.error is None]
    n_rungs = max(len(p) for p in plans.values())
    title = f"search rung {k + 1}/{n_rungs}"
    shown = [(t, plans[v][k][1]) for v, ts in trials.items() if k < len(plans[v]) for t in ts]
    if progress is not None:
        progress.show([(f"{t.base.variant} {t.label} ({f:.0%})", t.dir) for t, f in shown], title)
    if todo:
        echo(f"[search] {title}: {len(todo)} of {len(shown)} trial(s) to train "
             f"({', '.join(sorted({f'{f:.0%}' for _, f in todo}))} of the budget, validation only)")
    _train_rung(todo, title, f"rung{k + 1}", pool, ex, echo)
    if k == 0 and extend:
        _extend(trials, every if every is not None else {v: list(ts) for v, ts in trials.items()}, plans, extend,
                pool, ex, metric, echo)
    for v, alive in trials.items():
        if k >= len(plans[v]):
            continue
        frac, keep = plans[v][k][1], (plans[v][k + 1][0] if k + 1 < len(plans[v]) else 1)
        scored = [t for t in alive if t.score(frac) is not None]
        ranked = sorted(scored, key=lambda t: t.rank_key(frac, metric))
        trials[v] = ranked[:keep]
        by = scored[0].ranked_by(frac, metric) if scored else metric
        shown = ", ".join(f"{t.label} " + (f"loss {t.loss(frac):.3f}, " if t.loss(frac) is not None else "")
                          + f"{primary_name(t.result(frac))} {t.score(frac):.4f}" for t in ranked)
        echo(f"[search] {v}: rung {k + 1}/{len(plans[v])} ({frac:.0%} of the budget), validation ranked by {by}: "
             f"{shown or 'no trial finished'}; continuing: {', '.join(t.label for t in trials[v]) or 'none'}")


def primary_name(res: dict) -> str:
    from peftkit.report.summary import primary

    return primary(res)[0]


def trial_plan(cp: C.ComparePlan) -> tuple[dict[str, list[Trial]], dict[str, list]]:
    """Per variant: its trials (the grid on the first seed's run) and rung plan; every error before any run."""
    sc: SearchConfig = cp.search
    names = list(dict.fromkeys(r.variant for r in cp.runs))
    unknown = sorted(set(sc.variants) - set(names))
    if unknown:
        raise RecipeError(f"{cp.path}: search.variants: unknown variant(s) {', '.join(unknown)} "
                          f"(known: {', '.join(names)})")
    first = {}
    for r in cp.runs:
        first.setdefault(r.variant, r)
    trials, plans = {}, {}
    for v, base in first.items():
        space = sc.variants.get(v, sc)
        trials[v] = [Trial(base, p, cp.out) for p in points(space, base.recipe.strategy.name)]
        plans[v] = rungs(len(trials[v]), sc.eta)
    return trials, plans


def plan(path, out: Path, overrides: list[str] | None):
    """(compare recipe, base runs, per-variant trials and rung plans) of a compare recipe file."""
    cp = C.prepare(path, out, overrides)
    trials, plans = trial_plan(cp)
    return cp.recipe, list(cp.runs), trials, plans


def _final_runs(runs, chosen: dict[str, Trial]) -> list[RunSpec]:
    """The selected setting of every variant over every seed (the only runs that see test)."""
    out = []
    for r in runs:
        t = chosen.get(r.variant)
        if t is not None:
            out.append(r.with_recipe(R.from_dict(R.apply_overrides(r.recipe.to_dict(), C.dotted_overrides(t.point)))))
    return out


def _continue_from_trial(run, trial: Trial) -> None:
    from peftkit.training.checkpoint import DIR, read_manifest, step_dirs

    own = [p for p in step_dirs(run.dir / DIR) if (m := read_manifest(p)) and m.get("recipe_hash") == run.hash]
    if not run.done() and not own and step_dirs(trial.dir / DIR):
        link_checkpoints(trial.dir, run.dir)


def search(path, out, overrides=None, timeout=None, echo=print, executor: dict | None = None, progress=None) -> int:
    """:func:`run` of a compare recipe file with a ``search:`` section."""
    return run(C.prepare(path, out, overrides, executor=executor, timeout=timeout), echo, progress)


def run(cp: C.ComparePlan, echo=print, progress=None) -> int:
    """The search of a planned comparison. ``progress``: a live display
    (peftkit.training.progress.CompareProgress) shown the runs of each stage."""
    out, cr, runs, ex = cp.out, cp.recipe, list(cp.runs), cp.executor
    trials, plans = trial_plan(cp)
    pool = X.create(ex)
    out.mkdir(parents=True, exist_ok=True)
    every = {v: list(ts) for v, ts in trials.items()}
    n = sum(len(ts) for ts in trials.values())
    budgets = sum(cost(len(ts), cr.search.eta) for ts in trials.values())
    echo(f"[search] {n} grid point(s) over {len(trials)} variant(s); successive halving (eta {cr.search.eta}) on "
         f"validation: {budgets:.2f} run budgets for {len(trials)} variant(s) ({budgets / max(1, len(trials)):.2f}x "
         f"a plain comparison), then {len(cr.seeds) - 1} more seed(s) per variant at its selected setting")
    for k in range(max((len(p) for p in plans.values()), default=0)):
        _rung(trials, k, plans, pool, echo, ex, progress, cr.search.metric, cr.search.extend, every)
        write_state(out, _state(cr, every, trials, plans))
    chosen = {v: ts[0] for v, ts in trials.items() if ts}
    final = _final_runs(runs, chosen)
    for r in final:
        if r.seed == runs[0].seed:
            _continue_from_trial(r, chosen[r.variant])
    C.record_runs(cp, final)
    todo = [r for r in final if not r.done()]
    echo(f"[search] selected: {', '.join(f'{v} {t.label}' for v, t in chosen.items())}; "
         f"{len(todo)} of {len(final)} test run(s) to train")
    if progress is not None:
        progress.show([(f"{r.variant}/seed{r.seed}", r.dir) for r in final], "selected settings, test split")
    errors = _run_all(todo, pool, echo)
    for r, e in zip(todo, errors):
        echo(f"[search] {r.variant} seed {r.seed}: " + ("done" if e is None else f"FAILED ({e['message']})"))
    write_state(out, _state(cr, every, trials, plans))
    from peftkit.report.summary import report

    report(out, echo=echo)
    failed = sum(e is not None for e in errors) + sum(1 for v in trials if v not in chosen)
    return 1 if failed else 0


def _state(cr, every: dict, alive: dict, plans: dict) -> dict:
    """search.json: the grid, every trial's validation metric per rung, the selection."""
    variants = {}
    for v, ts in every.items():
        rows = []
        for t in ts:
            rs = {f"{frac:g}": {"validation": t.score(frac), "validation_loss": t.loss(frac), "steps": (
                t.result(frac) or {}).get("metrics", {}).get("stopped_at")} for _, frac in plans[v] if t.result(frac)}
            rows.append({"label": t.label, "point": t.point, "dir": str(t.dir.relative_to(t.out)), "rungs": rs, "error": t.error})
        metric = next((primary_name(t.result(f)) for t in ts for _, f in plans[v] if t.result(f)), None)
        by = next((t.ranked_by(f, cr.search.metric) for t in ts for _, f in plans[v] if t.result(f)), None)
        done = all(any(t.result(f) for t in ts) for _, f in plans[v])
        sel = alive[v][0] if alive[v] and done else None
        variants[v] = {"strategy": ts[0].recipe.strategy.name, "metric": metric, "ranked_by": by, "rungs": plans[v],
                       "trials": rows, "selected": sel.label if sel else None,
                       "selected_point": sel.point if sel else None,
                       # extension points (SearchConfig.extend) train the first rung's fraction each
                       "extended": [t.label for t in ts[plans[v][0][0]:]] if plans[v] else [],
                       "cost_budgets": cost(plans[v][0][0] if plans[v] else len(ts), cr.search.eta)
                       + (len(ts) - plans[v][0][0]) * plans[v][0][1] if plans[v] else cost(len(ts), cr.search.eta)}
    return {"eta": cr.search.eta, "split": "validation", "seed": cr.seeds[0], "variants": variants}
