"""The Python API on a tiny model: every call, returning what the CLI writes; model card; progress."""

from __future__ import annotations

import json

import pytest
import yaml

import peftkit
from peftkit import api as pk
from conftest import tiny_recipe
from peftkit.errors import RecipeError, UserError
from peftkit.training.progress import CompareProgress, line, overall_eta, read_run


def test_every_call(tiny_models, sentiment_dir, tmp_path):
    from huggingface_hub import ModelCard

    assert peftkit.load_recipe is pk.load_recipe and peftkit.train is pk.train
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=3)
    r = pk.load_recipe(base, overrides={"strategy.r": 4, "output.report_to": []})
    assert r.strategy.r == 4 and r.train.max_steps == 3
    with pytest.raises(RecipeError, match="strategy.r"):
        pk.load_recipe(base, overrides=["strategy.r=-1"])

    est = pk.estimate(r)
    assert est["peak_bytes"] > 0

    res = pk.train(r, out=tmp_path / "run")
    assert res == json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["speed"]["steps"] == 3 and res["run"]["recipe"]["strategy"]["r"] == 4
    with pytest.raises(UserError):  # a finished run is not silently overwritten
        pk.train(r, out=tmp_path / "run")

    s = pk.export(tmp_path / "run", tmp_path / "merged", verify=True, verify_examples=8)
    assert s["verify"]["passed"] and s["verify"] == json.loads((tmp_path / "merged" / "verify.json").read_text())
    card = ModelCard.load(tmp_path / "merged" / "README.md")  # the Hub's own card parser
    d = card.data.to_dict()
    assert d["library_name"] == "transformers" and d["pipeline_tag"] == "text-classification"
    assert {"peftkit", "lora", "merged"} <= set(d["tags"]) and "accuracy" in d["metrics"]
    (ev,) = [e for e in card.data.eval_results if e.metric_type == "accuracy"]
    assert ev.metric_value == pytest.approx(res["metrics"]["eval"]["accuracy"])
    assert d["peftkit"]["strategy"]["r"] == 4 and d["peftkit"]["verify"]["passed"] is True
    assert "AutoModelForSequenceClassification.from_pretrained" in card.text
    assert "base_model" not in d  # a local directory is no Hub id

    preds = pk.predict(tmp_path / "merged", ["a wonderful film", "awful and dull"])
    assert len(preds) == 2 and all({"label", "score"} <= set(p) for p in preds)

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**base, "output": {"report_to": []}}))
    cmp = tmp_path / "compare.yaml"
    cmp.write_text(yaml.safe_dump({"name": "api", "base": "base.yaml", "seeds": [0], "set": {"train.max_steps": 2},
                                   "variants": [{"name": "bitfit", "set": {"strategy.name": "bitfit"}}]}))
    rep = pk.compare(cmp, out=tmp_path / "cmp", progress=False, echo=lambda *a: None)
    assert rep == json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert [v["variant"] for v in rep["variants"]] == ["bitfit"] and not rep["failed"]
    assert (tmp_path / "cmp" / "report.html").stat().st_size > 0
    assert pk.report(tmp_path / "cmp", echo=lambda *a: None)["variants"] == rep["variants"]
    # The progress display reads the finished runs' dirs: done, at their last step.
    s = read_run(tmp_path / "cmp" / "bitfit" / "seed0", "bitfit")
    assert (s.state, s.step, s.total) == ("done", 2, 2)


def test_push_to_hub_operations(tmp_path):
    """No network here: only the commit operations push() would send are built and checked."""
    from peftkit.export.model_card import commit_operations, hub_id

    (tmp_path / "sub").mkdir()
    for name in ("config.json", "model.safetensors", "README.md", "sub/x.txt"):
        (tmp_path / name).write_text(name)
    ops = commit_operations(tmp_path)
    assert [o.path_in_repo for o in ops] == ["README.md", "config.json", "model.safetensors", "sub/x.txt"]
    assert all(o.path_or_fileobj == str(tmp_path / o.path_in_repo) for o in ops)
    assert hub_id("builtin:minilm") == "sentence-transformers/all-MiniLM-L6-v2" and hub_id(str(tmp_path)) is None


def _log(d, recs):
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 3, "partial')


def test_progress_lines_and_eta(tmp_path):
    rec = lambda step, t: {"step": step, "loss": 0.5, "total_steps": 10, "tokens_per_s": 1234.0,  # noqa: E731
                           "memory_bytes": 300 * 2**20, "time": t}
    _log(tmp_path / "a" / "seed0", [rec(2, 100.0), rec(4, 110.0)])  # 0.2 steps/s: 6 steps left = 30 s
    (tmp_path / "b" / "seed0").mkdir(parents=True)
    a, b = read_run(tmp_path / "a" / "seed0", "a/seed0"), read_run(tmp_path / "b" / "seed0", "b/seed0")
    assert (a.state, a.step, a.total, a.eta_s) == ("running", 4, 10, pytest.approx(30.0))
    assert line(a) == "a/seed0                  step 4/10  1,234 tok/s  300 MiB  ETA 0:30"
    assert b.state == "pending" and line(b).endswith("pending")
    # b will take as long as a in all (10 steps at 0.2/s = 50 s): 30 + 50 s, one run at a time.
    assert overall_eta([a, b]) == pytest.approx(80.0)
    p = CompareProgress(tmp_path, [tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"])
    assert not p.enabled  # pytest's stdout is no TTY: plain lines only
    assert p.render().splitlines()[-1] == "overall: 0/2 runs finished, ETA 1:20"
    # A search shows each rung's trials under a title (search.search calls show at every stage).
    p.show([("lora lr2e-03 (25%)", tmp_path / "a" / "seed0")], "search rung 1/2")
    assert p.render().splitlines() == ["search rung 1/2", "lora lr2e-03 (25%)       step 4/10  1,234 tok/s  300 MiB  ETA 0:30",
                                       "overall: 0/1 runs finished, ETA 0:30"]
