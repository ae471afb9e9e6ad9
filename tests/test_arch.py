"""peftkit.arch: the per-architecture table, its fallbacks, and an architecture added by one
entry (Phi-3: fused q/k/v and gate/up projections) trained end to end."""

import json
from types import SimpleNamespace

import pytest

from conftest import tiny_recipe
from peftkit import arch
from peftkit.model.build import build
from peftkit.errors import UserError
from peftkit.recipe import from_dict


@pytest.mark.parametrize("model_type", sorted(arch.ARCHS))
def test_every_entry_names_classes_that_exist(model_type):
    entry = arch.ARCHS[model_type]
    named = [entry.attention] if entry.attention else []
    named += [c for c, _ in filter(None, (entry.attn_out, entry.ffn_out))]
    assert all(isinstance(entry.cls(n), type) for n in named)
    assert entry.has_roles == bool(named) and (not entry.has_roles or all(entry.qkv))


@pytest.mark.parametrize("config,kind", [
    (SimpleNamespace(model_type="bert"), "encoder"),  # the table
    (SimpleNamespace(model_type="t5"), "seq2seq"),
    (SimpleNamespace(model_type="bert", is_decoder=True), "decoder"),  # the config outranks the table
    (SimpleNamespace(model_type="modernbert"), "encoder"),  # transformers' masked-LM mapping
    (SimpleNamespace(model_type="camembert"), "encoder"),  # masked-LM before causal-LM: both list it
    (SimpleNamespace(model_type="gemma"), "decoder"),  # causal-LM mapping only
    (SimpleNamespace(model_type="newarch", is_encoder_decoder=True), "seq2seq"),
    (SimpleNamespace(model_type="newarch", is_decoder=True), "decoder"),
    (SimpleNamespace(model_type="newarch", architectures=["NewArchForCausalLM"]), "decoder"),
    (SimpleNamespace(model_type="newarch", architectures=["NewArchForMaskedLM"]), "encoder"),
    (SimpleNamespace(model_type="newarch"), None),  # nothing says: no guess
])
def test_kind_from_the_table_else_the_config(config, kind):
    assert arch.kind(config) == kind


def test_model_type_without_loading(tmp_path):
    assert arch.model_type_of("builtin:minilm") == "bert"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    assert arch.model_type_of(str(tmp_path)) == "phi3"
    assert arch.model_type_of("some-org/hub-model") is None


def test_phi3_trains_with_every_table_driven_strategy(tiny_models, sentiment_dir, tmp_path):
    """The Phi-3 entry alone gives LoRA its fused targets, IA3 and adapters their roles,
    freeze its block list, prefix its attention class, and the FLOP counter its q/k/v."""
    from peftkit.training.trainer import Trainer

    for name in ("lora", "ia3", "adapter", "prefix", "freeze"):
        b = build(from_dict(tiny_recipe(tiny_models["phi3"], sentiment_dir, name, max_steps=2)))
        res = Trainer(b, tmp_path / name).fit()
        assert res["params"]["trainable"] < res["params"]["total"], name
        assert res["speed"]["model_flops_per_token"] > 0, name


def test_lora_targets_matching_nothing_is_a_user_error(tiny_models, sentiment_dir):
    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora")
    rec["strategy"]["target_modules"] = ["q_proj"]  # a Llama name on a BERT model
    with pytest.raises(UserError, match=r"strategy.target_modules: \['q_proj'\] match no module of Bert"):
        build(from_dict(rec))


@pytest.mark.parametrize("task,model,found", [("causal_lm", "bert", "an encoder"), ("seq2seq", "llama", "a decoder"),
                                              ("causal_lm", "t5", "a seq2seq")])
def test_generation_task_refuses_the_wrong_kind_of_model(task, model, found, tiny_models, tmp_path):
    from conftest import gen_recipe

    from peftkit.errors import RecipeError

    with pytest.raises(RecipeError, match=f"task '{task}' needs a .* model, but model.name=.* is {found}"):
        from_dict(gen_recipe(tiny_models[model], tmp_path, kind=task))
