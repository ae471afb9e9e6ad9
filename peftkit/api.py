"""The Python API: what the CLI does, for notebooks and scripts.

Each call returns the data the CLI writes (``result.json``, ``report.json``, ``verify.json``
shaped dicts), and bad input raises :class:`peftkit.errors.UserError` with the same one-line
message the CLI prints::

    from peftkit import api as pk

    r = pk.load_recipe("recipes/quickstart.yaml", overrides={"train.max_steps": 20})
    res = pk.train(r, out="runs/qs-lora")              # result.json as a dict
    print(res["metrics"]["eval"]["accuracy"])
    rep = pk.compare("recipes/quickstart/compare.yaml", out="runs/quickstart")
    pk.export("runs/qs-lora", "merged/", verify=True)  # export summary (+ verify, model card)
    pk.predict("merged/", ["a wonderful film"])         # [{"label": ..., "score": ...}]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit import recipe as R

Recipe = R.Recipe


def load_recipe(source: str | Path | dict | Recipe, overrides: dict[str, Any] | list[str] | None = None) -> Recipe:
    """A validated recipe from a YAML file, a dict (same keys as the YAML) or a Recipe.

    ``overrides``: ``{"train.lr": 3e-4}`` or CLI-style ``["train.lr=3e-4"]``.
    """
    from peftkit.runs.compare import dotted_overrides

    ovr = dotted_overrides(overrides) if isinstance(overrides, dict) else list(overrides or [])
    if isinstance(source, Recipe):
        source = source.to_dict()
    if isinstance(source, dict):
        return R.from_dict(R.apply_overrides(source, ovr))
    return R.load(source, ovr)


def fit(recipe: Recipe, out: str | Path, resume: bool = True) -> dict:
    """Train into ``out`` without checking it first (see :func:`train`); returns result.json."""
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    return Trainer(build(recipe), out, resume=resume).fit()


def train(recipe: str | Path | dict | Recipe, out: str | Path | None = None, *, force: bool = False,
          resume: bool = True) -> dict:
    """Train one recipe into a run directory (default: the recipe's ``output.dir``).

    A run dir with checkpoints of this recipe resumes (``resume=False``: start over); one
    holding other files needs ``force=True``. Returns the run's ``result.json`` as a dict.
    """
    from peftkit.training.rundir import check_run_dir

    r = load_recipe(recipe)
    out = Path(out or r.run_dir())
    mode = check_run_dir(out, r.hash(), force, resume=resume)
    return fit(r, out, resume=mode == "resume")


def compare(path: str | Path, out: str | Path, overrides: list[str] | None = None, *, timeout: float | None = None,
            progress: bool | None = None, executor: dict | None = None, echo=print) -> dict:
    """Run every variant x seed of a compare recipe, each in a fresh process, then report.

    Runs are grouped in the experiment trackers their recipes name (``output.report_to``).
    ``progress``: live per-run lines (default: when the terminal is a TTY). Returns
    ``report.json`` as a dict (``failed`` lists the runs that did not finish). ``executor``: where
    the runs execute, over the recipe's ``executor:`` section, e.g. ``{"name": "local", "parallel": 2}``
    (``slurm`` through submitit, ``ray``; see peftkit.runs.executors).
    """
    from peftkit.runs import compare as C
    from peftkit.training import tracking
    from peftkit.training.progress import CompareProgress

    plan = C.prepare(path, out, overrides, executor=executor, timeout=timeout)  # the one read of the recipe
    names = {n for r in plan.runs for n in tracking.resolve(r.recipe.output.report_to)}
    report_files = [plan.out / f for f in ("report.json", "report.md", "report.html")]
    with tracking.compare_group(plan.name, names, lambda: report_files), \
            CompareProgress(plan.out, [r.dir for r in plan.runs], enabled=progress) as live:
        shown = live.echo if live.enabled else echo
        if plan.search is not None:  # each variant at its best setting, chosen on validation
            from peftkit.runs import search

            search.run(plan, echo=shown, progress=live if live.enabled else None)
        else:
            C.run(plan, echo=shown)
    return json.loads((plan.out / "report.json").read_text())


def report(path: str | Path, *, screenshot: str | Path | None = None, echo=print) -> dict:
    """report.json / report.md / report.html and the plots from a directory of runs; returns report.json.

    ``screenshot``: also save a PNG of report.html as headless chromium renders it.
    """
    from peftkit.report.summary import report as _report

    data = _report(path, echo=echo)
    if screenshot:
        from peftkit.report.html import screenshot as shoot

        shoot(Path(path) / "report.html", Path(screenshot))
        echo(f"screenshot: {screenshot}")
    return data


def estimate(recipe: str | Path | dict | Recipe, *, batch_size: int | None = None, seq_len: int | None = None,
             device: str | None = None) -> dict:
    """Training memory per component before any weight loads (what ``peftkit estimate --json`` prints)."""
    from peftkit.estimate.trace import estimate as _estimate

    return _estimate(load_recipe(recipe), batch_size=batch_size, seq_len=seq_len, device=device)


def export(run_dir: str | Path, out: str | Path, *, verify: bool = False, dtype: str = "fp32",
           adapter_only: bool = False, verify_examples: int = 64, force: bool = False,
           push_to_hub: str | None = None, private: bool = True) -> dict:
    """Export a trained run as a plain transformers model (or adapter) with a model card.

    ``verify``: reload the export and compare it with the trained model (``summary["verify"]``,
    also ``out/verify.json``). ``push_to_hub``: upload ``out`` to that Hub repo afterwards.
    Returns the export summary (``export.json`` plus ``out``, ``bytes``, ``files``).
    """
    from peftkit.export import merge as E
    from peftkit.errors import UserError

    out = Path(out)
    if verify_examples < 1:
        raise UserError(f"--verify-examples: must be at least 1 (got {verify_examples})")
    E.check(run_dir, out, adapter_only, dtype)
    E.check_out_dir(out, force)
    s = E.export(run_dir, out, dtype=dtype, verify=verify, adapter_only=adapter_only, verify_examples=verify_examples)
    if push_to_hub:
        from peftkit.export.model_card import push

        s["hub"] = push(out, push_to_hub, private=private)
    return s


def predict(path: str | Path, inputs: list, *, batch_size: int = 32, max_new_tokens: int | None = None) -> list[dict]:
    """Predictions of an exported model or a run dir, one dict per input (label/score, tags or text)."""
    from peftkit.export.predict import Predictor

    return Predictor.load(path).predict(list(inputs), batch_size=batch_size, max_new_tokens=max_new_tokens)
