"""The untrained model as a comparison's reference row: one evaluation-only run per comparison.

Its recipe is the comparison's first run with ``train.max_steps: 0`` and a strategy that
leaves the model as loaded (``freeze``, nothing trained at 0 steps), unquantized: the same
data, evaluation and (for decoders) forgetting sample, so a strategy that ends below it is
worse than doing nothing. It runs once per comparison (not per strategy or seed), in a fresh
process where ``compare`` runs, into ``OUT/_untrained/eval/`` (outside the ``<variant>/seed<k>``
layout, so it is never taken for a variant); a re-run skips it while its recipe is unchanged.
"""

from __future__ import annotations

from pathlib import Path

from peftkit import recipe as R

DIR = "_untrained"


def reference_run(runs: list, out: Path):
    """The reference RunSpec of a comparison's planned runs (``peftkit.runs.spec.RunSpec``)."""
    first = runs[0]
    d = first.recipe.to_dict()
    d["strategy"] = {"name": "freeze", "layers": 0}
    d["model"]["quantization"] = "none"
    d["train"].update(max_steps=0, progress=False)
    d["output"].update(save_weights=False, report_to=[])
    recipe, where = R.from_dict(d, "the untrained reference"), Path(out) / DIR / "eval"
    return first.with_recipe(recipe, where)


def run_reference(runs: list, out: Path, timeout: float | None = None, echo=print) -> dict | None:
    """Evaluate the untrained model once (skipped when up to date); never fails the comparison."""
    from peftkit.runs import executors as X

    ref = reference_run(runs, out)
    if ref.done():
        echo("untrained reference: up to date")
        return None
    echo("untrained reference: evaluating the model as loaded (train.max_steps=0) ...")
    rep = X.execute(ref, timeout)
    err = rep.get("error")
    echo(f"untrained reference: {'failed: ' + str(err.get('message')) if err else 'done'} ({rep.get('seconds')} s)")
    return err
