"""The SST-2 benchmark's search section is rendered from a search's own files (search.json,
report.json): the selected rate is the one marked, failed trials say so, and targets compare
against full fine-tuning."""

import importlib.util
import json

from conftest import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("sst2_accuracy", ROOT / "benchmarks" / "sst2_accuracy.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _trial(lr, rungs, error=None):
    return {"label": f"lr{lr:g}", "point": {"train.lr": lr}, "error": error,
            "rungs": {f: {"validation": acc, "validation_loss": loss, "steps": st} for f, (loss, acc, st) in rungs.items()}}


def test_search_section_from_run_files(tmp_path):
    m = _module()
    state = {"eta": 2, "seed": 0, "variants": {
        "lora": {"ranked_by": "loss", "selected": "lr0.002", "selected_point": {"train.lr": 0.002}, "trials": [
            _trial(0.0006, {"0.25": (0.40, 0.81, 156)}),
            _trial(0.002, {"0.25": (0.35, 0.84, 156), "0.5": (0.30, 0.86, 312)}),
            _trial(0.006, {"0.25": (0.37, 0.83, 156), "0.5": (0.33, 0.85, 312)})]},
        "prefix": {"ranked_by": "loss", "selected": "lr0.03", "selected_point": {"train.lr": 0.03}, "trials": [
            _trial(0.003, {}, error="loss was NaN"), _trial(0.03, {"0.25": (0.5, 0.75, 156)})]}}}
    (tmp_path / "search.json").write_text(json.dumps(state))
    (tmp_path / "report.json").write_text(json.dumps({"search": {"test": [
        {"variant": "lora", "ci": [0.85, 0.88], "ci_method": "seeds", "edge": None, "vs_best": None},
        {"variant": "prefix", "ci": [0.70, 0.80], "ci_method": "seeds", "edge": "the selected lr 0.03 is the highest",
         "vs_best": {"worse": True, "difference": 0.1}}]}, "recommendation": {"text": "**Recommended: lora**"}}))
    s = m.collect_search(tmp_path)
    md = "\n".join(m.search_lines(s))
    assert "| lora | **0.002** | 0.3500 / 84.00 | 0.3000 / 86.00 |" in md
    assert "| lora | 0.0006 | 0.4000 / 81.00 |  |" in md
    assert "| prefix | 0.003 | failed |  |" in md
    assert "| lora | 0.002 | 85.00–88.00 (seeds) | best |  |" in md
    assert "| prefix | 0.03 | 70.00–80.00 (seeds) | significantly worse | the selected lr 0.03 is the highest |" in md
    assert md.rstrip().endswith("**Recommended: lora**")
    assert m.search_lines(m.collect_search(tmp_path / "missing")) == []


def test_targets_against_full():
    m = _module()
    rows = {"full": {"accuracy_mean": 0.880}, "lora": {"accuracy_mean": 0.8705}, "qlora": {"accuracy_mean": 0.869},
            "adapter": {"accuracy_mean": 0.875}}
    assert m.verdict("full", rows) == "≥89%: missed"
    assert m.verdict("lora", rows) == "within 1.0 pt of full: met"
    assert m.verdict("qlora", rows).startswith("within 1.0 pt of full: missed (-1.1 pt)")
    assert m.verdict("adapter", rows) == "within 1.0 pt of full: met"
