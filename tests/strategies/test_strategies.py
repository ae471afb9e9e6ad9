"""Strategy specifics beyond the shared contract: freeze's layer count, adapter placement and
identity at init, validation-time problems."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_recipe
from peftkit.model.build import build
from peftkit.errors import RecipeError, UserError
from peftkit.recipe import from_dict
from peftkit.strategies import count_params
from peftkit.strategies.adapter import Bottleneck
from peftkit.arch import find_blocks

TEXT = ["a great and moving film", "boring plot"]


def _recipe(model_dir, data_dir, strategy: dict, **model):
    rec = tiny_recipe(model_dir, data_dir)
    rec["strategy"] = strategy
    rec["model"] = {**rec["model"], **model}
    return from_dict(rec)


def _logits(b):
    b.model.eval()
    with torch.no_grad():
        return b.model(**b.tokenizer(TEXT, padding=True, return_tensors="pt")).logits


@pytest.mark.parametrize("layers,trained", [(-1, [False, True]), (0, [True, True]), (2, [False, False])])
def test_freeze_layer_count(tiny_models, sentiment_dir, layers, trained):
    b = build(_recipe(tiny_models["bert"], sentiment_dir, {"name": "freeze", "layers": layers}))
    _, blocks = find_blocks(b.model)
    assert [all(p.requires_grad for p in blk.parameters()) for blk in blocks] == trained
    assert not any(p.requires_grad for p in b.model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in b.model.bert.pooler.parameters())


@pytest.mark.parametrize("layers", [3, -3])
def test_freeze_more_layers_than_blocks_is_a_user_error(tiny_models, sentiment_dir, layers):
    with pytest.raises(UserError, match=r"strategy.layers: .* only 2 transformer blocks"):
        build(_recipe(tiny_models["llama"], sentiment_dir, {"name": "freeze", "layers": layers}))


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_adapter_starts_as_the_base_model(tiny_models, sentiment_dir, kind):
    for placement, per_block in (("houlsby", 2), ("pfeiffer", 1)):
        rec = _recipe(tiny_models[kind], sentiment_dir, {"name": "adapter", "placement": placement, "bottleneck": 4})
        plain = build(rec, apply_strategy=False)
        torch.manual_seed(0)
        base_logits = _logits(plain)
        adapted = plain.strategy.apply(plain.model, plain.head)
        found = [m for m in adapted.modules() if isinstance(m, Bottleneck)]
        assert len(found) == per_block * 2 and all(m.down.out_features == 4 for m in found)
        assert torch.equal(_logits(plain), base_logits)


def test_adapter_on_smaller_reduction_counts(tiny_models, sentiment_dir):
    b = build(_recipe(tiny_models["bert"], sentiment_dir, {"name": "adapter", "reduction_factor": 4}))
    h, bn = 32, 8
    assert count_params(b.model)[0] == 2 * 2 * (2 * h * bn + bn + h) + (2 * h + 2) + (h * h + h)  # + pooler (head)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_adapter_train_norms_adds_every_norm_by_type(tiny_models, sentiment_dir, kind):
    off = build(_recipe(tiny_models[kind], sentiment_dir, {"name": "adapter", "bottleneck": 4}))
    on = build(_recipe(tiny_models[kind], sentiment_dir, {"name": "adapter", "bottleneck": 4, "train_norms": True}))
    norm_params = [p for m in on.model.modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
                   for p in m.parameters(recurse=False)]
    assert norm_params and all(p.requires_grad for p in norm_params)
    assert count_params(on.model)[0] - count_params(off.model)[0] == sum(p.numel() for p in norm_params)


@pytest.mark.parametrize("strategy", ["full", "freeze", "bitfit"])
def test_base_training_strategies_refuse_a_quantized_backbone(tiny_models, sentiment_dir, strategy):
    with pytest.raises(RecipeError, match="cannot run on a quantized backbone"):
        _recipe(tiny_models["bert"], sentiment_dir, {"name": strategy}, quantization="4bit")


def test_adapter_and_ia3_accept_a_quantized_backbone(tiny_models, sentiment_dir):
    for s in ("adapter", "ia3"):
        assert _recipe(tiny_models["llama"], sentiment_dir, {"name": s}, quantization="4bit").model.quantization == "4bit"


def test_unknown_architecture_is_found_at_validation(tmp_path, sentiment_dir):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(RecipeError, match="adapter' does not know where to put adapters in 'opt'"):
        _recipe(tmp_path, sentiment_dir, {"name": "adapter"})
    with pytest.raises(RecipeError, match="ia3' has no default targets for 'opt'"):
        _recipe(tmp_path, sentiment_dir, {"name": "ia3"})
    explicit = _recipe(tmp_path, sentiment_dir, {"name": "ia3", "target_modules": ["v_proj"]})
    assert explicit.strategy.name == "ia3" and explicit.strategy.target_modules == ["v_proj"]


def test_bitfit_refuses_llama_with_a_clear_error(tiny_models, sentiment_dir):
    with pytest.raises(UserError, match="LlamaForSequenceClassification has no bias parameters"):
        build(_recipe(tiny_models["llama"], sentiment_dir, {"name": "bitfit"}))


def test_qlora_weights_are_never_repacked_for_cpu_inference(tiny_models, sentiment_dir):
    """bitsandbytes would re-pack 4-bit weights in place at the first no-grad forward on an
    AVX512-BF16 CPU (and fail for layers narrower than 64): peftkit turns that path off, so
    evaluation runs on the bytes training used, on every kind of CPU."""
    from conftest import tiny_recipe
    from peftkit import recipe as R
    from peftkit.model.build import build

    model = build(R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, "qlora"))).model
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and not any(flags)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    ids = torch.randint(5, 100, (2, 8))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n].detach()) for n in before)
