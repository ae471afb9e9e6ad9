"""Every strategy on every task kind: trains and evaluates, or is refused with one clear line.

The expected outcome per (task, strategy) is the table in README.md ("Strategies x tasks").
"""

from __future__ import annotations

import json

import pytest
from conftest import sentiment_rows
from conftest import fit, gen_recipe
from conftest import ner_recipe, ner_rows

from peftkit import strategies
from peftkit.errors import UserError

# (task kind, strategy) -> the start of the refusal; every other pair must train.
REFUSED = {
    ("causal_lm", "bitfit"): "strategy 'bitfit': LlamaForCausalLM has no bias parameters",
    ("seq2seq", "bitfit"): "strategy 'bitfit': T5ForConditionalGeneration has no bias parameters",
    ("seq2seq", "freeze"): "recipe: strategy 'freeze' freezes the first N blocks of one block stack",
    ("seq2seq", "adapter"): "recipe: strategy 'adapter' does not know where to put adapters in 't5'",
    ("seq2seq", "prefix"): "recipe: strategy 'prefix' supports model types",
    ("seq2seq", "ia3"): "recipe: strategy 'ia3' has no default targets for 't5'",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    gen, ner = tmp_path_factory.mktemp("gen"), tmp_path_factory.mktemp("ner")
    for split, n, seed in (("train", 32, 0), ("validation", 8, 1), ("test", 8, 2)):
        (gen / f"{split}.jsonl").write_text("".join(
            json.dumps({"review": r["text"].split(), "answer": [r["label"]]}) + "\n" for r in sentiment_rows(n, seed)))
        (ner / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ner_rows(n, seed)))
    return {"gen": gen, "ner": ner}


def _recipe(kind, strategy, tiny_models, data):
    if kind == "token_classification":
        rec = ner_recipe(tiny_models["bert"], data["ner"], strategy=strategy)
        rec["train"]["max_steps"] = 2
        return rec
    model = tiny_models["llama" if kind == "causal_lm" else "t5"]
    return gen_recipe(model, data["gen"], kind=kind, strategy=strategy, max_steps=2)


@pytest.mark.parametrize("kind", ["token_classification", "causal_lm", "seq2seq"])
@pytest.mark.parametrize("strategy", sorted(set(strategies.REGISTRY) - {"qlora"}))
def test_strategy_on_task(kind, strategy, tiny_models, data, tmp_path):
    # qlora = lora over a 4-bit backbone: bitsandbytes' CPU kernel needs >= 64 features per
    # layer, wider than the tiny models; it is covered on a real model in test_contract / CI runs.
    rec = _recipe(kind, strategy, tiny_models, data)
    refusal = REFUSED.get((kind, strategy))
    if refusal:
        with pytest.raises(UserError) as e:
            fit(rec, tmp_path / "run")
        assert str(e.value).startswith(refusal) and "\n" not in str(e.value)
        assert not (tmp_path / "run" / "result.json").exists()
        return
    res = fit(rec, tmp_path / "run")
    p = res["params"]
    assert res["speed"]["steps"] == 2
    assert p["trainable"] == p["total"] if strategy == "full" else 0 < p["trainable"] < p["total"]
    assert res["metrics"]["eval"]["examples"] == 8
    assert (tmp_path / "run" / "result.json").exists()


def test_ia3_on_t5_with_explicit_targets(tiny_models, data, tmp_path):
    rec = _recipe("seq2seq", "ia3", tiny_models, data)
    rec["strategy"].update(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
    res = fit(rec, tmp_path / "run")
    assert 0 < res["params"]["trainable"] < 1000


def test_bitfit_on_gpt2_causal_lm(tiny_models, data, tmp_path):
    res = fit(gen_recipe(tiny_models["gpt2"], data["gen"], strategy="bitfit", max_steps=2), tmp_path / "run")
    assert 0 < res["params"]["trainable"] < res["params"]["total"] // 10
