"""benchmarks/gpu_check.py in its CPU dry-run mode: every strategy is attempted, results are data."""

import pytest
import json
import subprocess
import sys

from conftest import ROOT

from peftkit import strategies


@pytest.mark.slow  # benchmark smoke: 47 s; `make test-slow`
def test_gpu_check_dry_run(tiny_models, sentiment_dir, tmp_path):
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--encoder", str(tiny_models["bert"]), "--decoder", str(tiny_models["llama"]),
                        "--data", str(sentiment_dir), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode in (0, 1), p.stderr[-3000:]  # 1 = some check failed (recorded, not raised)
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["schema"] == "peftkit.gpu_check/1" and r["dry_run"] is True
    assert r["env"]["versions"]["torch"] and r["peak_matmul_flops"] > 0
    assert [c["strategy"] for c in r["checks"]] == list(strategies.REGISTRY)
    for c in r["checks"]:
        assert c["ok"] or c["error"], c  # a failure is recorded with its error, never lost
    by = {c["strategy"]: c for c in r["checks"]}
    for name in ("full", "lora"):
        assert by[name]["ok"], by[name]
        assert "result.json" in by[name]["files"] and by[name]["eval"]["examples"] == 8
    # Speed table: both models, two attention implementations, MFU against the measured peak.
    assert {b["model"] for b in r["bench"]} == {str(tiny_models["bert"]), str(tiny_models["llama"])}
    for b in r["bench"]:
        assert b["ok"], b
        assert b["tokens_per_s"] > 0 and b["flops_per_token"] > 0 and 0 < b["mfu"] < 1
    # Scale-out: two compare runs at once through the local executor; FSDP needs >= 2 GPUs (skipped here).
    scale = {c["check"]: c for c in r["scale"]}
    assert scale["parallel"]["ok"], scale["parallel"]
    assert [x["status"] for x in scale["parallel"]["runs"]] == ["done", "done"]
    assert all("slot" in x["where"] for x in scale["parallel"]["runs"])
    assert scale["fsdp2-lora"]["ok"] is None and "skipped" in scale["fsdp2-lora"]["error"]
    md = (out / "gpu_check.md").read_text()
    assert "| lora |" in md and "MFU" in md and "| parallel | yes |" in md and (p.returncode == 0) == all(c["ok"] for c in r["checks"] + r["bench"])
