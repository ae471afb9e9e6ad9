"""The search: selection follows validation only; halving resumes checkpoints; a killed search resumes.

Runs execute in-process (``search._run_all`` swapped for a loop over ``cli.main``) to stay fast;
what is checked is the run directories' content, as a separate process would write it.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import in_process, tiny_recipe
from peftkit import cli
from peftkit.runs import search
from peftkit.io import atomic_write_text
from peftkit.recipe import dump_yaml


def write_compare(tmp_path, tiny_models, sentiment_dir, lrs, max_steps=8, seeds=(0,)):
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=max_steps, log_every=1,
                       checkpoint_every=None)
    base["output"] = {"report_to": []}
    f = tmp_path / "search.yaml"
    f.write_text(yaml.safe_dump({"base": base, "seeds": list(seeds), "variants": [{"name": "lora"}],
                                 "search": {"lr": lrs, "eta": 2}}))
    return f


def loss_steps(log):
    return [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]  # training steps


def test_rungs_and_cost():
    assert search.rungs(4, 2) == [(4, 0.25), (2, 0.5)]
    assert search.cost(4, 2) == pytest.approx(2.0)  # 4 x 1/4 + 2 x 1/4 + 1 x 1/2
    assert search.rungs(1, 2) == [] and search.cost(1, 2) == 1.0
    assert search.LogGrid(low=1e-4, high=1e-2, points=3).values() == [1e-4, 1e-3, 1e-2]


def test_selection_follows_validation_not_test(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    """Planted metrics: validation prefers lr 1e-3, test prefers 3e-3; test is never seen by trials."""
    from peftkit.training.trainer import Trainer

    planted = {("validation", 1e-3): 0.9, ("validation", 3e-3): 0.6, ("test", 1e-3): 0.55, ("test", 3e-3): 0.95}
    seen = []
    real = Trainer.evaluate

    def fake(self, model, ds):
        m, predictions = real(self, model, ds)
        split = "validation" if len(ds) == 32 else "test"
        seen.append((split, self.tc.lr, self.tc.seed))
        m["accuracy"] = planted[(split, self.tc.lr)] + 0.01 * self.tc.seed
        m["loss"] = 1.0 - m["accuracy"]  # what a rung ranks by (search.metric: loss)
        return m, predictions

    import csv

    rows = list(csv.DictReader(open(sentiment_dir / "test.csv")))[:24]  # test size tells the split apart
    d = tmp_path / "data"
    d.mkdir()
    for name in ("train", "validation"):
        (d / f"{name}.csv").write_text((sentiment_dir / f"{name}.csv").read_text())
    with open(d / "test.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setattr(Trainer, "evaluate", fake)
    monkeypatch.setattr(search, "_run_all", in_process)
    f = write_compare(tmp_path, tiny_models, d, [1e-3, 3e-3], max_steps=4, seeds=(0, 1))
    out = tmp_path / "out"
    assert search.search(f, out, echo=lambda *_: None) == 0
    st = json.loads((out / "search.json").read_text())["variants"]["lora"]
    assert st["selected_point"] == {"train.lr": 1e-3}
    assert [s for s in seen if s[0] == "test"] == [("test", 1e-3, 0), ("test", 1e-3, 1)]  # once per seed, selected only
    rep = json.loads((out / "report.json").read_text())
    test = rep["search"]["test"][0]
    assert test["values"] == pytest.approx([0.55, 0.56]) and test["ci"] is not None
    assert "edge" in test and "lowest" in test["edge"]  # 1e-3 is the grid's low end
    assert rep["recommendation"]["recommended"] == "lora"
    assert "## Recommendation" in (out / "report.md").read_text()


def test_halving_continues_from_checkpoints_and_resumes(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    f = write_compare(tmp_path, tiny_models, sentiment_dir, [1e-4, 1e-3, 1e-2], max_steps=8)
    out = tmp_path / "out"
    calls = []

    def killed(runs, pool=None, echo=None):  # the search process dies during rung 2, after its first trial
        trials = [t for r in runs for t in getattr(r, "runs", [r])]
        if any(t.recipe.train.stop_at == 0.5 for t in trials):
            in_process(trials[:1], record=calls)
            raise KeyboardInterrupt
        return in_process(runs, record=calls)

    monkeypatch.setattr(search, "_run_all", killed)
    with pytest.raises(KeyboardInterrupt):
        search.search(f, out, echo=lambda *_: None)
    assert len(calls) == 4  # 3 trials at 25%, 1 of 2 at 50%
    before_kill = calls[-1][1]  # the rung-2 trial that finished before the kill
    calls.clear()
    monkeypatch.setattr(search, "_run_all", lambda runs, pool=None, echo=None: in_process(runs, record=calls))
    assert search.search(f, out, echo=lambda *_: None) == 0
    assert [c[2] for c in calls] == [0.5, None]  # the other rung-2 trial, then the selected one to 100%
    assert calls[0][1] != before_kill
    st = json.loads((out / "search.json").read_text())["variants"]["lora"]
    sel = next(t for t in st["trials"] if t["label"] == st["selected"])
    assert {k: v["steps"] for k, v in sel["rungs"].items()} == {"0.25": 2, "0.5": 4}
    final = out / "lora" / "seed0"
    res = json.loads((final / "result.json").read_text())
    assert res["speed"]["resumed_from_step"] == 4 and res["speed"]["steps"] == 8
    assert res["metrics"]["eval_split"] == "test" and res["run"]["recipe"]["train"]["lr"] == sel["point"]["train.lr"]
    assert loss_steps(final / "log.jsonl") == list(range(1, 9))  # every step once: 1-4 in the trial, 5-8 here
    for t in st["trials"]:
        steps = loss_steps(out / t["dir"] / "log.jsonl")
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == max(v["steps"] for v in t["rungs"].values())
    calls.clear()
    assert search.search(f, out, echo=lambda *_: None) == 0 and calls == []  # all done: nothing retrained


def test_shipped_search_recipe_costs_about_twice_the_comparison(tmp_path):
    from conftest import ROOT

    f = ROOT / "recipes" / "quickstart" / "search.yaml"
    cr, runs, trials, plans = search.plan(f, tmp_path / "o", None)
    assert len(trials) == 8 and all(len(ts) == 3 for ts in trials.values())
    assert all(search.cost(len(ts), cr.search.eta) <= 2.0 for ts in trials.values())
    from peftkit.runs import compare

    plain = {r.variant: r.recipe for r in compare.plan(f.parent / "compare.yaml", tmp_path / "p")}
    for v, ts in trials.items():  # the same budget as the plain comparison; its rate is an inner grid point
        mine, theirs = next(r for r in runs if r.variant == v).recipe, plain[v]
        assert (mine.train.max_steps, mine.train.batch_size, mine.task) == (
            theirs.train.max_steps, theirs.train.batch_size, theirs.task), v
        lrs = sorted(t.point["train.lr"] for t in ts)
        assert theirs.train.lr in lrs[1:-1], (v, theirs.train.lr, lrs)


def test_bad_search_section_one_line(tmp_path, tiny_models, sentiment_dir):
    from peftkit.errors import RecipeError

    f = write_compare(tmp_path, tiny_models, sentiment_dir, {"low": 1e-3, "high": 1e-4, "points": 3})
    with pytest.raises(RecipeError, match="high"):
        search.plan(f, tmp_path / "o", None)
    data = yaml.safe_load(f.read_text())
    data["search"] = {"variants": {"nope": {"lr": [1e-3]}}}
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="unknown variant"):
        search.plan(f, tmp_path / "o", None)


def test_rungs_rank_by_validation_loss_or_by_the_metric_with_loss_breaking_ties():
    """Short rungs tie on accuracy (every low rate predicts one class): the loss ranks them; with
    search.metric primary, one more correct example beats any loss and the loss breaks ties."""
    from types import SimpleNamespace

    class Planted(search.Trial):
        def __init__(self, label, acc, loss):
            self.label, self.error, self.base = label, None, SimpleNamespace(variant="v")
            self.res = {"metrics": {"primary_metric": "accuracy", "eval": {"accuracy": acc, "loss": loss}}}

        def result(self, frac):
            return self.res

    lines = []
    ts = [Planted("lr1e-04", 0.4275, 0.69), Planted("lr1e-03", 0.4275, 0.61), Planted("lr1e-02", 0.4275, 0.72)]
    trials = {"v": list(ts)}
    search._rung(trials, 0, {"v": [(3, 0.25)]}, None, lines.append, metric="primary")
    assert [t.label for t in trials["v"]] == ["lr1e-03"] and "lr1e-03 loss 0.610, accuracy 0.4275" in lines[-1]
    for metric, best in (("primary", "lr3e-02"), ("loss", "lr1e-03")):
        trials = {"v": [*ts, Planted("lr3e-02", 0.43, 0.95)]}
        search._rung(trials, 0, {"v": [(4, 0.25)]}, None, lines.append, metric=metric)
        assert [t.label for t in trials["v"]] == [best], metric
        assert f"ranked by {'accuracy' if metric == 'primary' else 'loss'}" in lines[-1]


def test_edge_extension_adds_points_beyond_the_grid_on_validation(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    """search.extend: planted validation loss grows with lr, so each new best sits on the low edge and
    one more point a grid step below joins rung 1, twice; a re-run trains nothing."""
    from peftkit.training.trainer import Trainer

    real = Trainer.evaluate
    splits = []

    def fake(self, model, ds):
        m, predictions = real(self, model, ds)
        splits.append((self.tc.lr, self.tc.stop_at))
        m["loss"] = 1000 * self.tc.lr
        return m, predictions

    monkeypatch.setattr(Trainer, "evaluate", fake)
    calls = []
    monkeypatch.setattr(search, "_run_all", lambda runs, pool=None, echo=None: in_process(runs, record=calls))
    f = write_compare(tmp_path, tiny_models, sentiment_dir, [1e-3, 3e-3], max_steps=4)
    spec = yaml.safe_load(f.read_text())
    spec["search"]["extend"] = 2
    f.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    said = []
    assert search.search(f, out, echo=said.append) == 0
    st = json.loads((out / "search.json").read_text())["variants"]["lora"]
    assert [t["label"] for t in st["trials"]] == ["lr1e-03", "lr3e-03", "lr3.33e-04", "lr1.11e-04"]
    assert st["extended"] == ["lr3.33e-04", "lr1.11e-04"] and st["selected"] == "lr1.11e-04"
    assert st["cost_budgets"] == pytest.approx(search.cost(2, 2) + 2 * 0.5)  # each extension: rung 1's half
    assert [c[2] for c in calls] == [0.5, 0.5, 0.5, 0.5, None]  # 2 grid points, 2 extensions, the selected to 100%
    assert sum("on the grid's edge" in s for s in said) == 2
    # Only validation decided: the single test evaluation is of the selected rate, after the search.
    assert splits[-1] == (1.11e-4, None) and all(stop == 0.5 for _, stop in splits[:-1])
    calls.clear()
    assert search.search(f, out, echo=lambda *_: None) == 0 and calls == []


def test_beyond_edge():
    assert search.beyond_edge([1e-3, 3e-3, 1e-2], 1e-3) == pytest.approx(3.33e-4)
    assert search.beyond_edge([1e-3, 3e-3, 1e-2], 1e-2) == pytest.approx(3.33e-2)
    assert search.beyond_edge([1e-3, 3e-3, 1e-2], 3e-3) is None
    assert search.beyond_edge([1e-3], 1e-3) is None
