"""benchmarks/gpu_check.py in its CPU dry-run mode: every check is attempted, results are data."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, build_tiny

from peftkit import recipe as R, strategies


@pytest.fixture(scope="module")
def models64(tmp_path_factory):
    """Tiny BERT and Llama, hidden 64: bitsandbytes' CPU 4-bit kernel needs >= 64 input features
    and output features in multiples of 32 (the qlora rows run, not fail, on CPU)."""
    d = tmp_path_factory.mktemp("gpu-check-models")
    return {"bert": build_tiny("bert", d / "bert", hidden_size=64, intermediate_size=128),
            "llama": build_tiny("llama", d / "llama", hidden_size=64, intermediate_size=128, head_dim=16)}


@pytest.mark.slow  # benchmark smoke: ~75 s CPU (~3 min wall at load 8 on 2 shared cores); `make test-slow`
def test_gpu_check_dry_run(models64, sentiment_dir, tmp_path):
    out = tmp_path / "results"
    enc, dec = str(models64["bert"]), str(models64["llama"])
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run",
                        "--encoder", enc, "--decoder", dec, "--data", str(sentiment_dir), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode in (0, 1), p.stderr[-3000:]  # 1 = some check failed (recorded, not raised)
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["schema"] == "peftkit.gpu_check/1" and r["dry_run"] is True
    assert r["env"]["versions"]["torch"] and r["peak_matmul_flops"] > 0 and len(r["env"]["loadavg_end"]) == 3
    assert [c["strategy"] for c in r["checks"]] == list(strategies.REGISTRY)
    rows = r["checks"] + r["bench"] + r["compile"] + r["frozen"] + r["scale"]
    for c in rows:
        assert c["ok"] or c["error"], c  # a failure is recorded with its error, never lost
        assert c.get("ok") is not None or c["error"].startswith("skipped: "), c
    by = {c["strategy"]: c for c in r["checks"]}
    for name in ("full", "lora", "qlora"):
        assert by[name]["ok"], by[name]
        assert "result.json" in by[name]["files"] and by[name]["eval"]["examples"] == 8
    # Speed table: both models, two attention implementations and qlora, MFU against the measured
    # peak, every row's step peak beside the trainer's estimate (CPU: live tensors, ~exact).
    assert {(b["model"], b["strategy"], b["attn"]) for b in r["bench"]} == {
        (m, s, a) for m in (enc, dec) for s, a in (("lora", "sdpa"), ("lora", "eager"), ("qlora", "sdpa"))}
    for b in r["bench"]:
        assert b["ok"], b
        assert b["tokens_per_s"] > 0 and b["flops_per_token"] > 0 and 0 < b["mfu"] < 1
        assert b["step_peak_bytes"] > 0 and b["estimate_at"] == "the measured step's batch"
        assert abs(b["estimate_error"]) < 0.05, b
    for b in (b for b in r["bench"] if b["strategy"] == "qlora"):
        assert b["quantization"] == "4bit" and b["vs_lora"]["tokens_per_s"] > 0 and b["vs_lora"]["step_peak"] > 0
    # Compiled vs eager, same bucketed batches: compile time apart from the steady steps.
    comp = r["compile"]
    assert [(c["model"], c["compile"]) for c in comp] == [(enc, False), (enc, True)]
    eager, compiled = comp
    assert eager["ok"] and compiled["ok"], comp
    assert compiled["backend"] == "eager" and compiled["graphs"] >= 1 and compiled["dynamo_compile_s"] > 0
    assert compiled["padding"] == eager["padding"] == "multiple of 16"
    assert compiled["step_batch_shape"][1] % 16 == 0 == eager["step_batch_shape"][1] % 16
    assert compiled["first_step_s"] > compiled["step_time_median_s"] and compiled["steps"] == 6
    assert compiled["vs_eager"]["compile_s"] > 0 and compiled["vs_eager"]["speedup"] > 0
    assert compiled["mfu"] is None and 0 < compiled["vs_eager"]["mfu"] < 1  # at eager's FLOPs per token
    assert eager["mfu"] > 0 and eager["flops_per_token"] > 0
    # Frozen weights: kept fp32 vs stored in bf16 under bf16 autocast.
    fz = r["frozen"]
    assert [c["frozen_dtype"] for c in fz] == ["keep", "auto"]
    if "frozen_dtype" in R.ModelConfig.model_fields:
        keep, auto = fz
        assert keep["ok"] and auto["ok"], fz
        assert keep["frozen_weights"] is None and auto["frozen_weights"]["dtype"] == "bfloat16"
        assert auto["frozen_weights"]["bytes_saved"] > 0 and auto["vs_keep"]["step_peak"] < 1
    # Scale-out: two compare runs at once through the local executor; FSDP needs >= 2 GPUs (skipped here).
    scale = {c["check"]: c for c in r["scale"]}
    assert scale["parallel"]["ok"], scale["parallel"]
    assert [x["status"] for x in scale["parallel"]["runs"]] == ["done", "done"]
    assert all("slot" in x["where"] for x in scale["parallel"]["runs"])
    assert scale["fsdp2-lora"]["ok"] is None and "skipped" in scale["fsdp2-lora"]["error"]
    md = (out / "gpu_check.md").read_text()
    for section in ("## Speed and memory", "## bitsandbytes 4-bit", "## Compiled vs eager", "## Frozen weights"):
        assert section in md
    assert "| lora |" in md and "MFU" in md and "est. error" in md and "| parallel | yes |" in md
    assert (p.returncode == 0) == all(c["ok"] is not False for c in rows)
