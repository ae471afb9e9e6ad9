"""Attention kernel choice (model.attn_implementation) and the load-time report of it."""

import pytest
import torch
import transformers.modeling_utils  # noqa: F401  (imported before torch.cuda is faked)

from peftkit.errors import UserError
from peftkit.model import backbone


def _gpu(monkeypatch, capability, installed):
    """Pretend a CUDA GPU of ``capability`` with the FlashAttention distributions ``installed``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    real = backbone.importlib.util.find_spec
    monkeypatch.setattr(backbone.importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "flash_attn" else real(name, *a))
    monkeypatch.setattr(backbone, "_installed", lambda dist: dist in installed)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_auto_without_cuda_is_sdpa_and_says_why():
    impl, why = backbone.attention_choice("auto", torch.bfloat16)
    assert impl == "sdpa"
    assert "not flash_attention_4" in why and "CUDA" in why
    assert backbone.attention_choice("auto", torch.float32) == ("sdpa", "auto: float32 weights (FlashAttention needs bf16/fp16)")


def test_auto_prefers_fa4_on_hopper(monkeypatch):
    _gpu(monkeypatch, (9, 0), {"flash-attn-4"})
    impl, why = backbone.attention_choice("auto", torch.bfloat16)
    assert impl == "flash_attention_4" and "flash-attn-4" in why and "9.0" in why


def test_auto_fa2_on_ampere_even_with_fa4_installed(monkeypatch):
    _gpu(monkeypatch, (8, 0), {"flash-attn-4", "flash-attn"})
    assert backbone.attention_choice("auto", torch.bfloat16)[0] == "flash_attention_2"
    _gpu(monkeypatch, (8, 9), {"flash-attn-4"})  # FA4 needs Hopper+, FA2 missing: SDPA
    impl, why = backbone.attention_choice("auto", torch.float16)
    assert impl == "sdpa" and "compute capability >= 9.0" in why and "'flash-attn' package" in why


def test_explicit_missing_kernel_is_one_line(monkeypatch):
    _gpu(monkeypatch, (9, 0), set())
    with pytest.raises(UserError, match=r"^model.attn_implementation: flash_attention_4 needs the 'flash-attn-4' "
                                        r"package .*; here the 'flash-attn-4' package is not installed"):
        backbone.check_attention("flash_attention_4")
    backbone.check_attention("sdpa")  # no requirement


def test_load_reports_attention_and_kernels(tiny_models):
    from peftkit import recipe as R
    from peftkit.tasks import get as get_task

    rec = R.from_dict({"model": {"name": str(tiny_models["llama"])},
                       "task": {"kind": "causal_lm", "prompt": "{q}", "response_column": "a",
                                "data": {"dir": ".", "train": "t.jsonl"}},
                       "strategy": {"name": "lora"}})
    tok = backbone.load_tokenizer(rec.model)
    loaded = backbone.load(rec.model, get_task(rec.task, tok), tok)
    info = loaded.info
    assert info["attn_implementation"] == loaded.model.config._attn_implementation
    assert info["attn_reason"].startswith("auto:")
    if not torch.cuda.is_available():
        assert info["kernels"] == {"used": "none", "fused_loss": False,
                                   "reason": "auto: Liger's kernels are Triton (CUDA only); this run is on cpu"}
    line = backbone.attention_line(info)
    assert line.startswith(f"attention {info['attn_implementation']} (auto: ") and "; kernels none (auto: " in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_this_gpu_loads_what_it_says(tiny_models):
    from transformers import AutoModelForCausalLM

    impl, _ = backbone.attention_choice("auto", torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16, attn_implementation=impl).cuda()
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    assert m(input_ids=ids, labels=ids).loss.isfinite()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cli_explicit_flash_on_cpu_exits_2(tiny_models, instr_dir, tmp_path):
    import yaml
    from conftest import gen_recipe, run_cli

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(gen_recipe(tiny_models["llama"], instr_dir)))
    p = run_cli("train", str(path), "model.attn_implementation=flash_attention_2", "output.dir=" + str(tmp_path / "run"))
    assert p.returncode == 2, p.stderr
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "model.attn_implementation: flash_attention_2 needs the 'flash-attn' package" in err[0]
    assert "none is visible" in err[0] and not (tmp_path / "run").exists()
