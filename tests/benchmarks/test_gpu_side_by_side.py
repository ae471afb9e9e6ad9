"""benchmarks/gpu_side_by_side.py: the target lines from data, the run order, and its CPU dry run."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_side_by_side as S  # noqa: E402


def _row(shape, strategy, tool, tps, p50=1.0, mx=1.2, fpt=None):
    return {"shape": shape, "strategy": strategy, "tool": tool, "speed": {"tokens_per_s": tps},
            "step_p50_s": p50, "step_max_s": mx, "flops_per_token": fpt}


def test_targets_are_computed_from_the_rows():
    rows = [_row("llama-3.1-8b", "qlora", "peftkit", 1805, mx=3.0), _row("llama-3.1-8b", "qlora", "hf", 4349),
            _row("llama-3.1-8b", "full", "peftkit", 5600, fpt=6 * 8e9), _row("llama-3.1-8b", "full", "hf", 5000),
            _row("llama-3.2-1b", "lora", "peftkit", 100)]  # no HF row: not measured, not a pass
    t = {x["target"]: x for x in S.targets(rows, peak=700e12)}
    q = t["llama-3.1-8b qlora peftkit: tokens/s >= 1.3x HF"]
    assert q["pass"] is False and q["value"] == pytest.approx(1805 / 4349)
    assert t["llama-3.1-8b qlora peftkit: no steady step > 1.5x median"]["pass"] is False
    assert t["llama-3.1-8b full peftkit: tokens/s >= 1.1x HF"]["pass"] is True
    mfu = t["llama-3.1-8b full peftkit: MFU >= 45% of measured bf16 peak"]
    assert mfu["value"] == pytest.approx(5600 * 6 * 8e9 / 700e12) and mfu["pass"] is False
    assert t["llama-3.2-1b lora peftkit: tokens/s >= 1.3x HF"]["pass"] is None


def test_plan_runs_the_slowest_gap_first():
    a = S.parse(["--shapes", "llama-3.2-1b", "llama-3.1-8b", "--strategies", "lora", "qlora", "full"])
    assert S.plan(a)[:2] == [("llama-3.1-8b", "qlora"), ("llama-3.1-8b", "full")] and len(S.plan(a)) == 6
    tools = S.tools(a)
    assert tools[:2] == ["peftkit", "hf"] and tools[-1] == "peftkit-defaults"
    assert ("trl" in tools) == S.importable("trl")


@pytest.mark.slow  # ~50 s on a loaded 2-core CPU (three in-process training runs + estimate traces)
def test_dry_run_writes_rows_targets_and_environment(tmp_path):
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_side_by_side.py"), "--dry-run",
                        "--strategies", "lora", "--profile", "--out", str(out), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "gpu_side_by_side.json").read_text())
    assert r["schema"] == S.SCHEMA and r["dry_run"] is True and r["env"]["versions"]["torch"]
    rows = {x["tool"]: x for x in r["rows"]}
    assert {"peftkit", "hf", "peftkit-defaults"} <= set(rows)
    for x in rows.values():
        assert not x.get("error"), x.get("error")
        assert x["speed"]["tokens_per_s"] > 0 and x["step_p50_s"] <= x["step_p90_s"] <= x["step_max_s"]
    pk = rows["peftkit"]
    assert pk["backbone"]["attn_implementation"] == "sdpa" and pk["kernels_apply"]["padding_free"] is False
    assert pk["estimate_bytes"] > 0 and pk["estimate_error"] is not None
    assert {t["target"].split(":")[0] for t in r["targets"]} == {"tiny lora peftkit", "tiny lora peftkit-defaults"}
    assert (out / "gpu_side_by_side.md").read_text().count("| tiny | lora |") == 3
    assert len(list((out / "gpu_side_by_side.profile").glob("*.txt"))) == 3
