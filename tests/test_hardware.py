"""precision auto: what each kind of machine resolves to, the slow-bf16 warning, compare pins one."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from peftkit import hardware
from peftkit import recipe as R
from peftkit.errors import RecipeError, UserError

FAST = {"matmul_n": 128, "fp32_gflops": 100.0, "bf16_gflops": 400.0, "bf16_speed_factor": 4.0}
SLOW = {"matmul_n": 128, "fp32_gflops": 50.0, "bf16_gflops": 2.5, "bf16_speed_factor": 0.05}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with (capability, flags, probe); caches cleared before and after."""
    def fake(cap, flags, probe):
        hardware.resolve.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
        monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
        monkeypatch.setattr(hardware, "probe", lambda: probe)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    yield fake
    hardware.resolve.cache_clear()


@pytest.mark.parametrize("cap,flags,probe,want", [
    ("AVX2", {"avx2", "fma"}, SLOW, "fp32"),                       # AMD EPYC, AVX2 only
    ("AVX512", {"avx512f", "avx512_bf16"}, FAST, "bf16"),          # EPYC with AVX512-BF16
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, FAST, "bf16"),  # Xeon with AMX
    ("AVX512", {"avx512f", "avx512bw"}, FAST, "fp32"),             # AVX-512 without bf16 units
    ("AVX2", {"avx512f", "amx_bf16"}, FAST, "fp32"),               # AMX CPU under ATEN_CPU_CAPABILITY=avx2
    ("AVX512", {"avx512f", "amx_bf16"}, SLOW, "fp32"),             # flags say yes, kernels don't (ONEDNN_MAX_CPU_ISA)
    ("DEFAULT", None, FAST, "fp32"),                               # no /proc/cpuinfo, no AVX-512 path
])
def test_auto_on_each_kind_of_cpu(cpu, cap, flags, probe, want):
    cpu(cap, flags, probe)
    p = hardware.resolve("auto")
    assert (p.resolved, p.requested, p.device, p.mixed_precision) == (want, "auto", "cpu", want if want != "fp32" else "no")
    assert p.probe == probe and cap in p.reason
    rec = p.record()
    assert rec["resolved"] == want and rec["reason"] == p.reason and rec["probe"]["bf16_speed_factor"] == probe["bf16_speed_factor"]
    assert p.line().startswith(f"precision {want} (requested auto: ")


def test_explicit_bf16_on_a_slow_cpu_runs_with_one_warning(cpu):
    cpu("AVX2", {"avx2"}, SLOW)
    r = R.from_dict({"train": {"precision": "bf16"}})
    lines = []
    p = hardware.for_run(r, lines.append)
    assert p.resolved == "bf16" and p.reason == "as requested"
    assert len(lines) == 1 and "20x slower than fp32" in lines[0] and "auto picks fp32" in lines[0]
    cpu("AVX512", {"amx_bf16"}, FAST)
    lines.clear()
    assert hardware.for_run(r, lines.append).resolved == "bf16" and lines == []


def test_bf16_weights_on_a_slow_cpu_warn_too(cpu):
    cpu("AVX2", {"avx2"}, SLOW)
    lines = []
    hardware.for_run(R.from_dict({"model": {"dtype": "bf16"}, "train": {"precision": "fp32"}}), lines.append)
    assert len(lines) == 1 and lines[0].startswith("model.dtype bf16")


def test_fp16_needs_cuda(cpu):
    cpu("AVX2", {"avx2"}, SLOW)
    with pytest.raises(UserError, match="train.precision: fp16 autocast needs a CUDA GPU"):
        hardware.resolve("fp16")


def test_compute_dtype_auto_follows_the_resolved_precision(cpu):
    cpu("AVX2", {"avx2"}, SLOW)
    q = R.from_dict({"strategy": {"name": "qlora"}})
    assert (q.train.precision, q.model.compute_dtype) == ("auto", "auto")  # the schema defaults
    p = hardware.pinned(q)
    assert (p.train.precision, p.model.compute_dtype) == ("fp32", "fp32")
    assert q.hash() != p.hash() and q.train.precision == "auto"  # the recipe itself is unchanged
    cpu("AVX512", {"amx_bf16"}, FAST)
    assert hardware.compute_dtype(q) == "bf16"
    assert hardware.compute_dtype(R.from_dict({"model": {"compute_dtype": "fp32"}})) == "fp32"


def test_this_machine_is_consistent():
    hardware.resolve.cache_clear()
    p = hardware.resolve("auto")
    native, why = hardware.cpu_native_bf16()
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: auto follows the GPU")
    assert p.reason.startswith(why) and p.probe["fp32_gflops"] > 0 and p.probe["bf16_gflops"] > 0
    assert p.resolved == ("bf16" if native and p.probe["bf16_speed_factor"] >= hardware.MIN_NATIVE_FACTOR else "fp32")
    assert hardware.probe() is hardware.probe()  # measured once per process


def test_avx2_emulation_resolves_to_fp32():
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "CUDA_VISIBLE_DEVICES": ""}
    code = ("import json, torch; from peftkit import hardware; p = hardware.resolve('auto'); "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), p.resolved]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == ["AVX2", "fp32"]


def test_every_shipped_recipe_says_auto():
    for p in (ROOT / "recipes").rglob("*.yaml"):
        data = yaml.safe_load(p.read_text())
        if isinstance(data, dict) and "train" in data:
            assert data["train"].get("precision") == "auto", p


def _compare(tmp_path, variants: str):
    (tmp_path / "c.yaml").write_text(f"base: {ROOT / 'recipes' / 'quickstart.yaml'}\nvariants:\n{variants}")
    return tmp_path / "c.yaml"


def test_compare_pins_one_precision_for_every_variant(cpu, tmp_path):
    from peftkit.runs import compare

    cpu("AVX2", {"avx2"}, SLOW)
    path = _compare(tmp_path, "  - {name: a, set: {strategy.name: lora}}\n  - {name: b, set: {strategy.name: full}}\n")
    runs = compare.plan(path, tmp_path / "out")
    assert [r.recipe.train.precision for r in runs] == ["fp32", "fp32"]
    assert {r.requested_precision for r in runs} == {"auto"}
    mixed = _compare(tmp_path, "  - {name: a}\n  - {name: b, set: {train.precision: bf16}}\n")
    with pytest.raises(RecipeError, match=r"variant 'b': train.precision='bf16' differs from variant 'a' \('fp32'\)"):
        compare.plan(mixed, tmp_path / "out")
    cpu("AVX512", {"amx_bf16"}, FAST)  # there both resolve to bf16: the same comparison is fine
    assert {r.recipe.train.precision for r in compare.plan(mixed, tmp_path / "out")} == {"bf16"}


def test_report_says_which_precision(tmp_path):
    from peftkit.report.summary import precision_used

    rec = {"requested": "auto", "resolved": "fp32", "reason": "CPU kernels at AVX2", "device": "cpu", "probe": None}
    rows = [{"variant": "a", "precision": {**rec, "requested": "fp32", "reason": "as requested"}},
            {"variant": "b", "precision": {**rec, "requested": "fp32", "reason": "as requested"}}]
    assert precision_used(rows, rec) == "fp32 (requested auto: CPU kernels at AVX2)"
    assert precision_used(rows) == "fp32 (requested fp32: as requested)"
    rows[1]["precision"] = {**rec, "resolved": "bf16"}
    assert precision_used(rows, rec) == "mixed: a fp32, b bf16"
    assert precision_used([{"variant": "a"}]) is None
