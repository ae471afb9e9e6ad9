"""One contract for every registered strategy, on tiny random BERT, Llama, GPT-2 and Phi-3.

A new strategy gets this test by its registry line, and must add its expected trainable
parameter count to ``EXPECTED`` below (the test fails without it).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, tiny_recipe
from peftkit import strategies
from peftkit.model.build import build
from peftkit.errors import UserError
from peftkit.io import save_safetensors
from peftkit.recipe import from_dict
from peftkit.strategies import count_params
from peftkit.strategies.peft_backed import adapter_modules

ARCHS = ("bert", "llama", "gpt2", "phi3")
LABELS = 2  # the synthetic sentiment data: pos/neg

# Variants beyond each registered strategy's defaults: case -> recipe sections.
VARIANTS = {
    "freeze": {"strategy": {"name": "freeze", "layers": 1}},
    "lora-dora": {"strategy": {"name": "lora", "dora": True}},
    "lora-rslora": {"strategy": {"name": "lora", "rslora": True}},
    "adapter-4bit": {"strategy": {"name": "adapter"}, "model": {"quantization": "4bit"}},
}
CASES = sorted(set(strategies.REGISTRY) | set(VARIANTS))


def dims(kind: str) -> dict:
    c = TINY[kind]()
    h = c.hidden_size
    heads = c.num_attention_heads
    kv = h // heads * getattr(c, "num_key_value_heads", heads)
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    # BERT's classifier has a bias, and its pooler (dense h->h + bias) belongs to the task head.
    head = LABELS * h + (LABELS + h * h + h if kind == "bert" else 0)
    return {"h": h, "L": c.num_hidden_layers, "I": inter, "kv": kv, "head": head}


def lora(kind, r=8, dora=False):
    d = dims(kind)
    h, inter, kv = d["h"], d["I"], d["kv"]
    # r * (in + out) per adapted linear (+ out for DoRA's magnitude vector), per layer.
    per_layer = {
        # query, key, value, attention output (h->h); intermediate (h->I); output (I->h)
        "bert": (r * (10 * h + 2 * inter), 5 * h + inter),
        # q, o (h->h); k, v (h->kv); gate, up (h->I); down (I->h)
        "llama": (r * (9 * h + 2 * kv + 3 * inter), 3 * h + 2 * kv + 2 * inter),
        # c_attn (h->3h), attention c_proj (h->h), c_fc (h->I), mlp c_proj (I->h)
        "gpt2": (r * (8 * h + 2 * inter), 5 * h + inter),
        # fused qkv_proj (h->h+2kv), o (h->h), fused gate_up_proj (h->2I), down (I->h)
        "phi3": (r * (6 * h + 2 * kv + 3 * inter), 3 * h + 2 * kv + 2 * inter),
    }[kind]
    return d["L"] * (per_layer[0] + (per_layer[1] if dora else 0)) + d["head"]


def adapter(kind):
    d = dims(kind)
    h, b = d["h"], d["h"] // 16  # default reduction_factor 16
    return d["L"] * 2 * (2 * h * b + b + h) + d["head"]  # houlsby: 2 adapters per block


def ia3(kind):
    d = dims(kind)
    # key + value output sizes (GPT-2, Phi-3: fused q,k,v) + the feed-forward intermediate size.
    kv = {"bert": 2 * d["h"], "llama": 2 * d["kv"], "gpt2": 3 * d["h"], "phi3": d["h"] + 2 * d["kv"]}[kind]
    return d["L"] * (kv + d["I"]) + d["head"]


def bitfit(kind):
    d = dims(kind)
    h, inter = d["h"], d["I"]
    # per block: q,k,v,o (BERT) or c_attn(3h)+c_proj (GPT-2) = 4h; 2 norms 2h; FFN I + h.
    extra = {"bert": h, "gpt2": h}[kind]  # BERT: embedding norm (the pooler is in the head); GPT-2: ln_f
    return d["L"] * (7 * h + inter) + extra + d["head"]


def freeze(kind, layers=1):
    d = dims(kind)
    h, inter, kv = d["h"], d["I"], d["kv"]
    block = {"bert": 4 * h * h + 2 * h * inter + 9 * h + inter,
             "llama": 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h,
             "phi3": 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h,  # fused, same sizes as llama
             "gpt2": 4 * h * h + 2 * h * inter + 9 * h + inter}[kind]
    above = {"bert": 0, "llama": h, "gpt2": 2 * h, "phi3": h}[kind]  # final norm (BERT's pooler is in the head)
    return (d["L"] - layers) * block + above + d["head"]


def prefix(kind, tokens=16):
    d = dims(kind)
    return d["L"] * 2 * tokens * d["kv"] + d["head"]  # a key and a value per virtual token per layer


# case -> f(kind, total params) -> expected trainable params.
EXPECTED = {
    "full": lambda kind, total: total,
    "freeze": lambda kind, total: freeze(kind),
    "lora": lambda kind, total: lora(kind),
    "lora-dora": lambda kind, total: lora(kind, dora=True),
    "lora-rslora": lambda kind, total: lora(kind),
    "qlora": lambda kind, total: lora(kind),
    "adapter": lambda kind, total: adapter(kind),
    "adapter-4bit": lambda kind, total: adapter(kind),
    "prefix": lambda kind, total: prefix(kind),
    "ia3": lambda kind, total: ia3(kind),
    "bitfit": lambda kind, total: bitfit(kind),
}
# Documented refusals at apply time: (case, arch) -> text in the UserError.
REFUSED = {("bitfit", "llama"): "no bias parameters", ("bitfit", "phi3"): "no bias parameters"}
SENTENCES = ["a great and moving film", "boring plot", "the acting was dull and weak", "fun"]


def _build(case, kind, tiny_models, sentiment_dir):
    rec = tiny_recipe(tiny_models[kind], sentiment_dir, "lora")
    for section, values in VARIANTS.get(case, {"strategy": {"name": case}}).items():
        rec[section] = {**rec.get(section, {}), **values}
    b = build(from_dict(rec))
    if b.recipe.model.quantization != "none":
        import bitsandbytes as bnb

        # bitsandbytes' packed CPU inference kernel (used in eval mode) needs >= 64 input
        # features per layer; the tiny models have 32. Keep the plain 4-bit matmul.
        for m in b.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    return b


def _logits(b):
    batch = b.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return b.model(**batch).logits.float()


@pytest.mark.parametrize("kind", ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_strategy_contract(case, kind, tiny_models, sentiment_dir, tmp_path):
    assert case in EXPECTED, f"strategy '{case}' has no expected trainable-count formula in EXPECTED"
    if (case, kind) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[case, kind]):
            _build(case, kind, tiny_models, sentiment_dir)
        return
    b = _build(case, kind, tiny_models, sentiment_dir)
    model = b.model
    model.eval()  # no dropout: logits below must be reproducible

    trainable, total = count_params(model)
    assert trainable == EXPECTED[case](kind, total), (trainable, total)
    base = b.strategy.base_model(model)
    assert b.head and all(any(p.requires_grad for p in base.get_submodule(h).parameters()) for h in b.head)

    # Two steps: LoRA's A and an adapter's down projection get a zero gradient while their
    # zero-initialised partner is still zero, and move only in the second step.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = b.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0, 0, 1])
    for _ in range(2):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, f"{n}: requires_grad={p.requires_grad} but changed={changed}"

    # Save only the strategy's weights; a fresh model + those weights gives the same logits.
    trained = _logits(b)
    sd = b.strategy.state_dict(model)
    assert len(sd) == sum(p.requires_grad for p in model.parameters())
    save_safetensors(tmp_path / "s.safetensors", sd)
    fresh = _build(case, kind, tiny_models, sentiment_dir)
    fresh.model.eval()
    assert not torch.equal(_logits(fresh), trained)
    fresh.strategy.load_state_dict(fresh.model, load_file(tmp_path / "s.safetensors"))
    assert torch.equal(_logits(fresh), trained)

    if not b.strategy.can_merge:
        with pytest.raises(NotImplementedError):
            b.strategy.merge(model)
        return
    from transformers import PreTrainedModel

    merged = b.strategy.merge(model)
    assert isinstance(merged, PreTrainedModel)
    assert not adapter_modules(merged)
    b.model = merged
    if b.recipe.model.quantization == "none":
        # fp32 (tiny_recipe pins it): W x + B(A x) vs (W + BA) x differ by rounding only, ~1e-7 of O(1) logits.
        torch.testing.assert_close(_logits(b), trained, atol=1e-5, rtol=0)
    else:
        # Merging into 4-bit weights re-quantizes them: close, not exact.
        torch.testing.assert_close(_logits(b), trained, atol=0.1, rtol=0)
