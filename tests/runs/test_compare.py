import json
import shutil

import pytest
import yaml

from conftest import run_cli, tiny_recipe
from peftkit.runs import compare as C
from peftkit.errors import RecipeError
from peftkit.report.table import pareto


def _compare_file(tmp_path, tiny_models, sentiment_dir, variants, **extra):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=3)))
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": "base.yaml", "seeds": [0], "variants": variants, **extra}))
    return f


@pytest.mark.slow  # 62 s; compare end to end is also covered by test_executors and test_api
def test_compare_runs_skips_and_records_failures(tiny_models, sentiment_dir, tmp_path):
    broken = tmp_path / "broken-model"  # a config but no weights: fails at load time, in its process
    broken.mkdir()
    shutil.copy(tiny_models["bert"] / "config.json", broken)
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [
        {"name": "full", "set": {"strategy.name": "full", "train.lr": 1.0e-4}},
        {"name": "broken", "set": {"model.name": str(broken)}},
        {"name": "lora-r4", "set": {"strategy.name": "lora", "strategy.r": 4}},
    ])
    out = tmp_path / "out"
    p = run_cli("compare", str(f), "--out", str(out))
    assert p.returncode == 1, p.stderr  # one failed run -> non-zero, the others still ran
    for v in ("full", "lora-r4"):
        res = json.loads((out / v / "seed0" / "result.json").read_text())
        assert res["speed"]["steps"] == 3 and res["run"]["seed"] == 0
        mem = res["memory"]
        assert {"estimate", "measured", "peak_bytes", "errors"} <= set(mem)
        assert abs(mem["errors"]["estimate_vs_measured"]) < 0.10  # vs the measured live peak of step 2
    err = json.loads((out / "broken" / "seed0" / "error.json").read_text())
    assert err["returncode"] == 2 and "broken-model" in err["message"]
    assert not (out / "broken" / "seed0" / "result.json").exists()
    for name in ("report.md", "report.json", "accuracy_vs_memory.png", "accuracy_vs_speed.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "| full |" in md and "| lora-r4 (lora) |" in md and "x |" in md and "broken seed 0" in md
    rep = json.loads((out / "report.json").read_text())
    assert [v["variant"] for v in rep["variants"]] == ["full", "lora-r4"] and rep["baseline"] == "full"
    lora = rep["variants"][1]
    assert lora["vs_full"]["trainable"] < 0.1 and lora["trainable"] < rep["variants"][0]["trainable"]

    mtime = (out / "full" / "seed0" / "result.json").stat().st_mtime_ns
    p = run_cli("compare", str(f), "--out", str(out))
    assert p.returncode == 1
    assert p.stdout.count("up to date, skipped") == 2  # only the failed run is tried again
    assert (out / "full" / "seed0" / "result.json").stat().st_mtime_ns == mtime

    p = run_cli("report", str(out))
    assert p.returncode == 0 and "lora-r4" in p.stdout


def test_compare_validates_every_variant_up_front(tiny_models, sentiment_dir, tmp_path):
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [
        {"name": "a", "set": {"strategy.name": "lora"}},
        {"name": "b", "set": {"strategy.name": "lora", "strategy.rank": 4}},
    ])
    with pytest.raises(RecipeError, match=r"variant 'b'.*unknown key 'strategy.rank'"):
        C.plan(f, tmp_path / "o")
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [
        {"name": "a", "set": {"strategy.name": "lora"}},
        {"name": "b", "set": {"strategy.name": "full", "train.batch_size": 4}},
    ])
    with pytest.raises(RecipeError, match=r"variant 'b': train.batch_size=4 differs from variant 'a'"):
        C.plan(f, tmp_path / "o")
    f.write_text(yaml.safe_dump({"base": "base.yaml", "variants": [{"name": "a", "sett": {}}]}))
    p = run_cli("compare", str(f), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "variants.0.sett" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_plan_seeds_and_hashes(tiny_models, sentiment_dir, tmp_path):
    f = _compare_file(tmp_path, tiny_models, sentiment_dir, [{"name": "full", "set": {"strategy.name": "full"}}],
                      seeds=[0, 1], set={"train.lr": 3.0e-4})
    runs = C.plan(f, tmp_path / "o")
    assert [(r.variant, r.seed, r.recipe.train.seed, r.recipe.train.lr) for r in runs] == [
        ("full", 0, 0, 3.0e-4), ("full", 1, 1, 3.0e-4)]
    assert runs[0].hash != runs[1].hash and str(runs[1].dir).endswith("full/seed1")


def test_pareto_front():
    # (memory, accuracy): lower memory and higher accuracy are better.
    pts = [(100, 0.80), (50, 0.79), (60, 0.70), (200, 0.81)]
    assert pareto(pts, lower_x_better=True) == [0, 1, 3]
    # (throughput, accuracy): higher is better on both axes.
    assert pareto([(10, 0.8), (20, 0.7), (5, 0.6)], lower_x_better=False) == [0, 1]


def test_shipped_compare_recipes_validate(tmp_path):
    from conftest import ROOT

    shipped = sorted([*(ROOT / "recipes").rglob("compare*.yaml"), *(ROOT / "recipes").rglob("search*.yaml")])
    assert shipped
    for f in shipped:
        runs = C.plan(f, tmp_path / "o")
        assert len({r.variant for r in runs}) >= 3, f
        # One shared budget: the same steps (or epochs), batch and data for every variant.
        budgets = {(r.recipe.train.max_steps, r.recipe.train.epochs, r.recipe.train.batch_size,
                    r.recipe.task.data.model_dump_json()) for r in runs}
        assert len(budgets) == 1, (f, budgets)


@pytest.mark.parametrize("kind, name, eval_metrics", [
    ("causal_lm", "rougeL", {"rougeL": 0.4125, "rouge1": 0.5, "eval_loss": 2.5}),
    ("seq2seq", "bleu", {"bleu": 12.5, "chrf": 30.0, "eval_loss": 3.0}),
    ("token_classification", "f1", {"f1": 0.625, "precision": 0.5}),
])
def test_report_shows_the_metric_each_run_recorded(tmp_path, kind, name, eval_metrics):
    # Generation tasks choose their primary metric by task.metric: the class knows only "loss".
    from peftkit.report import summary as report

    for strategy, scale in (("full", 1.0), ("lora", 0.5)):
        d = tmp_path / strategy / "seed0"
        d.mkdir(parents=True)
        res = {"run": {"task": kind, "strategy": strategy},
               "params": {"trainable": 10, "total": 100, "trainable_pct": 10.0},
               "metrics": {"eval": {k: v * scale for k, v in eval_metrics.items()}, "primary_metric": name}}
        (d / "result.json").write_text(json.dumps(res))
    rows, failed, order = report.collect(tmp_path)
    assert {r["variant"]: (r["metric_name"], r["metric"]) for r in rows} == {
        "full": (name, eval_metrics[name]), "lora": (name, eval_metrics[name] * 0.5)}
    md = report.markdown(report.aggregate(rows, order), failed, "t")
    assert f"{eval_metrics[name]:.4f}" in md and f"{eval_metrics[name] * 0.5:.4f}" in md and name in md
