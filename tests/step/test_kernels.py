"""Fused kernels (Liger), per-block compile and the padding-free decision (peftkit/step/kernels.py)."""

import copy

import pytest
import torch

from peftkit.errors import UserError
from peftkit.step import kernels


def _llama(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="sdpa")


def _liger_importable() -> bool:
    return kernels._liger()[0] is not None


def test_liger_choice_rules(monkeypatch):
    assert kernels.liger_choice("none", "llama", True, "cuda") == (False, "model.kernels: none")
    use, why = kernels.liger_choice("auto", "llama", True, "cpu")
    assert not use and why == "auto: Liger's kernels are Triton (CUDA only); this run is on cpu"
    with pytest.raises(UserError, match=r"^model.kernels: liger cannot run: Liger's kernels are Triton"):
        kernels.liger_choice("liger", "llama", True, "cpu")
    monkeypatch.setattr(kernels, "_liger", lambda: (None, "liger-kernel cannot be imported (x); pip install liger-kernel"))
    assert kernels.liger_choice("auto", "llama", True, "cuda") == (
        False, "auto: liger-kernel cannot be imported (x); pip install liger-kernel")
    with pytest.raises(UserError, match="pip install liger-kernel"):
        kernels.liger_choice("liger", "llama", True, "cuda")


def test_liger_choice_uncovered_or_not_causal(monkeypatch):
    monkeypatch.setattr(kernels, "_liger", lambda: (object(), None))
    monkeypatch.setattr(kernels, "liger_covers", lambda t: t == "llama")
    assert kernels.liger_choice("auto", "llama", True, "cuda")[0]
    assert kernels.liger_choice("auto", "bert", False, "cuda") == (
        False, "auto: liger-kernel has no kernels for model type 'bert'")
    assert not kernels.liger_choice("auto", "llama", False, "cuda")[0]  # a classifier: no fused loss to gain
    assert kernels.liger_choice("liger", "llama", False, "cuda")[0]  # asked for: norms, RoPE, SwiGLU
    with pytest.raises(UserError, match="no kernels for model type 'bert'"):
        kernels.liger_choice("liger", "bert", False, "cuda")


def test_fused_loss_chunk_follows_ligers_rule():
    assert kernels.fused_loss_chunk(4 * 4096, 4096, 32000) == 2048  # liger's own worked example
    assert kernels.fused_loss_chunk(8 * 512, 2048, 128256) == 128  # ceil(4096 / 63) = 66 -> 128
    assert kernels.fused_loss_chunk(10, 4096, 4096) == 10  # never more than the tokens


@pytest.mark.skipif(not _liger_importable(), reason="liger-kernel (and triton) not importable")
def test_apply_liger_patches_the_instance_not_the_classes(tiny_models):
    from transformers.models.llama import modeling_llama

    stock_norm, stock_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    model = _llama(tiny_models)
    info = kernels.apply_liger(model, "liger", "cuda")
    try:
        assert info == {"used": "liger", "reason": "CUDA, liger covers 'llama'", "fused_loss": True}
        assert type(model.model.norm).__name__ != "LlamaRMSNorm" or model.model.norm.forward.__func__ is not stock_norm.forward
        assert modeling_llama.LlamaRMSNorm is stock_norm  # a model built later is stock
        assert modeling_llama.apply_rotary_pos_emb is not stock_rope  # RoPE only exists module-wide
        with kernels.stock():
            assert modeling_llama.apply_rotary_pos_emb is stock_rope
        assert modeling_llama.apply_rotary_pos_emb is not stock_rope
    finally:
        with kernels.stock():
            pass
        for module, names in kernels._GLOBAL_PATCHES.items():
            for name, (orig, _) in names.items():
                setattr(module, name, orig)
        kernels._GLOBAL_PATCHES.clear()


def test_padding_free_decided_in_one_place():
    from peftkit import recipe as R

    def rec(**train):
        return R.from_dict({"model": {"name": "builtin:smollm2"},
                            "task": {"kind": "causal_lm", "prompt": "{q}", "response_column": "a",
                                     "data": {"dir": ".", "train": "t.jsonl"}}, "train": train})

    assert kernels.padding_free(rec(), "flash_attention_4", "cuda") == (
        True, "default: causal LM on CUDA with flash_attention_4's variable-length kernel")
    assert kernels.padding_free(rec(), "sdpa", "cuda")[0] is False
    assert kernels.padding_free(rec(), "flash_attention_2", "cpu")[0] is False
    assert kernels.padding_free(rec(padding_free=False), "flash_attention_2", "cuda") == (False, "train.padding_free")
    assert kernels.padding_free(rec(padding_free=True), "sdpa", "cpu") == (True, "train.padding_free")
    cls = R.from_dict({"task": {"kind": "classification"}})
    assert kernels.padding_free(cls, "flash_attention_2", "cuda")[0] is False


def test_apply_refuses_two_compiles():
    from peftkit import recipe as R

    rec = R.from_dict({"model": {"compile": "blocks"}, "train": {"compile": True}})
    with pytest.raises(UserError, match="^model.compile: blocks and train.compile: true"):
        kernels.apply(torch.nn.Linear(2, 2), rec, "cpu")


@pytest.mark.slow  # CPU inductor: ~100 s on a shared 2-core machine
def test_compile_blocks_same_loss_and_grads_same_keys(tiny_models):
    from peftkit import recipe as R

    torch.manual_seed(0)
    eager = _llama(tiny_models)
    compiled = copy.deepcopy(eager)
    rec = R.from_dict({"model": {"compile": "blocks"}})
    model, info = kernels.apply(compiled, rec, "cpu")
    assert model is compiled and info["compiled_blocks"] == 2 and info["padding_free"] is False
    assert list(model.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix: checkpoints unchanged
    ids = torch.randint(3, 1000, (2, 12))
    losses = []
    for m in (eager, model):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    ge = eager.model.layers[0].mlp.up_proj.weight.grad
    gc = model.model.layers[0].mlp.up_proj.weight.grad
    assert torch.allclose(ge, gc, atol=1e-5)
    assert kernels.compile_seconds() > 0


def test_compile_blocks_one_graph_for_all_blocks(tiny_models):
    """Wiring on dynamo without inductor (fast): every block compiled, one graph reused, same loss."""
    import torch._dynamo.utils as du

    torch._dynamo.reset()
    eager = _llama(tiny_models)
    compiled = copy.deepcopy(eager)
    assert kernels.compile_blocks(compiled, backend="aot_eager") == 2
    ids = torch.randint(3, 1000, (2, 12))
    before = du.counters["stats"]["unique_graphs"]
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert du.counters["stats"]["unique_graphs"] - before == 1  # the second block reuses the first's graph
    assert torch.allclose(loss, eager(input_ids=ids, labels=ids).loss, atol=1e-6)
    assert kernels.compile_seconds() > 0
    with torch.no_grad():  # evaluation and generation (KV cache) stay eager: no per-layer recompiles
        out = compiled.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 7) and du.counters["stats"]["unique_graphs"] - before == 1


def test_compile_blocks_sees_through_peft(tiny_models):
    import peft

    model = peft.get_peft_model(_llama(tiny_models), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    blocks = kernels.decoder_blocks(model)
    assert len(blocks) == 2 and all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    with pytest.raises(UserError, match="^model.compile: blocks: no decoder blocks"):
        kernels.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.skipif(not torch.cuda.is_available() or not _liger_importable(), reason="needs CUDA and liger-kernel")
def test_liger_on_cuda_same_loss_no_logits(tiny_models):
    ref = _llama(tiny_models).cuda()
    fused = copy.deepcopy(ref)
    assert kernels.apply_liger(fused, "liger", "cuda")["fused_loss"]
    ids = torch.randint(3, 1000, (2, 16), device="cuda")
    fused.train()
    out = fused(input_ids=ids, labels=ids)
    assert out.logits is None  # the fused loss never built them
    assert torch.allclose(out.loss, ref(input_ids=ids, labels=ids).loss, atol=1e-3)


def test_estimate_traces_the_fused_loss_without_logits(tiny_models, instr_dir, monkeypatch):
    """With Liger's fused loss the estimate holds no batch x seq x vocab logits (what really runs)."""
    from conftest import gen_recipe

    from peftkit import recipe as R
    from peftkit.estimate.trace import estimate

    rec = R.from_dict(gen_recipe(tiny_models["llama"], instr_dir))
    b, t, vocab = 4, 32, 30522
    stock = estimate(rec, batch_size=b, seq_len=t, device="cpu")
    monkeypatch.setattr(kernels, "liger_choice", lambda *a: (True, "forced"))
    fused = estimate(rec, batch_size=b, seq_len=t, device="cpu")
    logits_fp32 = b * t * vocab * 4
    assert stock["peak_bytes"] - fused["peak_bytes"] >= logits_fp32  # at least one fp32 logits copy gone
    assert fused["peak_bytes"] < logits_fp32  # the whole step now holds less than one logits tensor
