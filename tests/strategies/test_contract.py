"""One contract for every registered strategy, on tiny random BERT, Llama, GPT-2 and Phi-3.

A new strategy gets this test by its registry line. The expected trainable count is the
strategy's own ``expected_trainable(facts)``: a formula from the method's definition over
``ModelFacts`` read from the model before the strategy is applied (config sizes, shapes of
modules found by type), compared here with ``count_params`` of the applied model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from peftkit import strategies
from peftkit.model.build import build
from peftkit.errors import UserError
from peftkit.io import save_safetensors
from peftkit.recipe import from_dict
from peftkit.strategies import ModelFacts, count_params
from peftkit.strategies.peft_backed import adapter_modules

ARCHS = ("bert", "llama", "gpt2", "phi3")

# Variants beyond each registered strategy's defaults: case -> recipe sections.
VARIANTS = {
    "freeze": {"strategy": {"name": "freeze", "layers": 1}},
    "lora-dora": {"strategy": {"name": "lora", "dora": True}},
    "lora-rslora": {"strategy": {"name": "lora", "rslora": True}},
    "adapter-4bit": {"strategy": {"name": "adapter"}, "model": {"quantization": "4bit"}},
}
CASES = sorted(set(strategies.REGISTRY) | set(VARIANTS))


# Documented refusals at apply time: (case, arch) -> text in the UserError.
REFUSED = {("bitfit", "llama"): "no bias parameters", ("bitfit", "phi3"): "no bias parameters"}
SENTENCES = ["a great and moving film", "boring plot", "the acting was dull and weak", "fun"]


def _build(case, kind, tiny_models, sentiment_dir, facts: list | None = None):
    """The built case; ``facts`` (a list) receives the ModelFacts of the model before the strategy."""
    rec = tiny_recipe(tiny_models[kind], sentiment_dir, "lora")
    for section, values in VARIANTS.get(case, {"strategy": {"name": case}}).items():
        rec[section] = {**rec.get(section, {}), **values}
    b = build(from_dict(rec), apply_strategy=False)
    if facts is not None:
        facts.append(ModelFacts.of(b.model, b.head))
    b.model = b.strategy.apply(b.model, b.head)  # as build() does
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
    if (case, kind) in REFUSED:
        with pytest.raises(UserError, match=REFUSED[case, kind]):
            _build(case, kind, tiny_models, sentiment_dir)
        return
    facts = []
    b = _build(case, kind, tiny_models, sentiment_dir, facts)
    model = b.model
    model.eval()  # no dropout: logits below must be reproducible

    trainable, total = count_params(model)
    assert trainable == b.strategy.expected_trainable(facts[0]), (trainable, total, facts[0])
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
