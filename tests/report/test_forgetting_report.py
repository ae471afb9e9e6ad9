"""The untrained reference row, forgetting columns, the accuracy-vs-forgetting plot, the recommendation."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import gen_recipe

from peftkit.report import forgetting as F
from peftkit.report.summary import report


def result(strategy: str, metric: float, rise: float | None, se: float = 0.01, seed: int = 0) -> dict:
    """The result.json keys a report reads (a real run writes many more)."""
    res = {"run": {"strategy": strategy, "task": "causal_lm", "seed": seed}, "params": {
        "trainable": 10, "total": 100, "trainable_pct": 10.0}, "memory": {}, "speed": {},
        "metrics": {"eval": {"rougeL": metric}, "primary_metric": "rougeL"}}
    if rise is not None:
        res["forgetting"] = {"data": "builtin:general-text", "rise": rise, "rise_se": se, "loss_before": 3.0,
                             "loss_after": 3.0 + rise, "perplexity_before": 20.1}
    return res


def write(out, variant, res, seed=0):
    d = out / variant / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(res))


def test_reference_row_marks_below_untrained_and_recommends(tmp_path):
    out = tmp_path / "cmp"
    write(out, "full", result("full", 0.30, 0.20))
    write(out, "lora", result("lora", 0.25, 0.01, se=0.005))
    write(out, "prefix", result("prefix", 0.09, 0.001))
    ref = result("freeze", 0.15, 0.0, se=0.0)
    (out / F.REFERENCE_RESULT).parent.mkdir(parents=True)
    (out / F.REFERENCE_RESULT).write_text(json.dumps(ref))
    lines: list[str] = []
    data = report(out, echo=lines.append)
    assert data["reference"]["metric"] == 0.15 and data["reference"]["lm_loss"] == 3.0
    below = {a["variant"]: a["below_untrained"] for a in data["variants"]}
    assert below == {"full": False, "lora": False, "prefix": True}
    # full has the best metric but forgets 0.2 nats/token: the rule picks lora
    assert data["recommendation"]["variant"] == "lora" and "0.05 nats/token" in data["recommendation"]["rule"]
    md = (out / "report.md").read_text()
    assert "| untrained (reference) | 0.1500 |" in md
    assert "| prefix | 0.0900 | -0.0600 **below untrained** |" in md
    assert "| full | 0.3000 | +0.1500 | +0.2000 ± 0.0100 |" in md and "**Recommendation: lora**" in md
    assert (out / "accuracy_vs_forgetting.png").stat().st_size > 1000
    assert "below untrained: prefix (0.0900)" in lines and "untrained reference: rougeL 0.1500" in lines
    assert [v["variant"] for v in data["variants"]] == ["full", "lora", "prefix"]  # the reference is no variant


def test_seeds_combine_forgetting_and_no_forgetting_no_section(tmp_path):
    out = tmp_path / "cmp"
    write(out, "lora", result("lora", 0.2, 0.02, se=0.03), 0)
    write(out, "lora", result("lora", 0.3, 0.04, se=0.04), 1)
    a = report(out, echo=lambda *_: None)["variants"][0]
    assert a["forgetting"] == pytest.approx(0.03) and a["forgetting_se"] == pytest.approx(0.025)
    out2 = tmp_path / "enc"
    write(out2, "lora", result("lora", 0.2, None))
    data = report(out2, echo=lambda *_: None)
    assert data["recommendation"] is None and "Untrained reference" not in (out2 / "report.md").read_text()


@pytest.mark.slow  # ~27 s: one variant x two seeds and one reference, each in a fresh process
def test_compare_runs_reference_once(tiny_models, instr_dir, tmp_path):
    from peftkit.runs import compare as C

    base = gen_recipe(tiny_models["llama"], instr_dir, task={"forgetting": {"sequences": 2, "max_length": 16}},
                      max_steps=2)
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": base, "seeds": [0, 1], "variants": [
        {"name": "lora", "set": {"strategy.name": "lora"}}]}))
    lines: list[str] = []
    assert C.compare(f, tmp_path / "out", echo=lines.append) == 0
    ref = json.loads((tmp_path / "out" / F.REFERENCE_RESULT).read_text())
    assert ref["speed"]["steps"] == 0 and ref["forgetting"]["rise"] == pytest.approx(0.0, abs=1e-6)
    assert sum("untrained reference: evaluating" in x for x in lines) == 1
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["reference"]["metric"] == ref["metrics"]["eval"]["accuracy"]
    assert all(a["forgetting"] is not None for a in rep["variants"])
    lines.clear()
    assert C.compare(f, tmp_path / "out", echo=lines.append) == 0
    assert "untrained reference: up to date" in lines


def test_forgetting_from_the_untrained_model_when_blocks_match(tmp_path):
    out = tmp_path / "cmp"
    prefix = result("prefix", 0.2, -0.6)  # its own start (random prefixes) was far worse than the base model
    prefix["forgetting"].update(block_loss_before=[4.0, 4.2, 3.8, 4.1], block_loss_after=[3.5, 3.6, 3.4, 3.5])
    write(out, "prefix", prefix)
    write(out, "lora", result("lora", 0.3, 0.01))  # no blocks recorded: its own start stays the basis
    ref = result("freeze", 0.15, 0.0, se=0.0)
    ref["forgetting"]["block_loss_before"] = [3.0, 3.1, 2.9, 3.0]
    (out / F.REFERENCE_RESULT).parent.mkdir(parents=True)
    (out / F.REFERENCE_RESULT).write_text(json.dumps(ref))
    v = {a["variant"]: a for a in report(out, echo=lambda *_: None)["variants"]}
    assert v["prefix"]["forgetting"] == pytest.approx(0.5) and v["prefix"]["forgetting_basis"] == "untrained model"
    assert v["lora"]["forgetting"] == pytest.approx(0.01) and v["lora"]["forgetting_basis"] == "run start"
