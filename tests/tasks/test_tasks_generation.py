"""Generation tasks: causal-LM instruction tuning and seq2seq, on tiny random models."""

import json

import pytest
import yaml
from conftest import ROOT, SHARED_DATA, built, fit, gen_recipe, run_cli, sentiment_rows

from peftkit import recipe as R
from peftkit.errors import DataError, RecipeError
from peftkit.tasks import generation as G


def test_causal_labels_mask_prompt_and_padding(tiny_models, instr_dir):
    b = built(gen_recipe(tiny_models["llama"], instr_dir))
    task, tok = b.task, b.tokenizer
    ds = task.datasets()
    ex = ds["test"][0]
    n_prompt = len(ex["prompt_ids"])
    assert ex["input_ids"][:n_prompt] == ex["prompt_ids"] and ex["prompt_ids"][0] == tok.bos_token_id
    assert all(y == -100 for y in ex["labels"][:n_prompt])
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["labels"][n_prompt:-1]) == ex["refs"][0]
    assert len(ex["refs"]) == 2
    feats = [ds["test"][i] for i in range(4)]
    batch = task.collate(feats)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["attention_mask"][i].sum() == n and (batch["labels"][i, n:] == -100).all()
        p = len(f["prompt_ids"])  # generation prompts are padded on the left
        assert batch["gen_input_ids"][i, -p:].tolist() == f["prompt_ids"] and batch["gen_attention_mask"][i].sum() == p
    assert "prompt_ids" not in ds["train"].column_names  # train batches are plain model inputs


def test_packing_keeps_every_labelled_token(tiny_models, instr_dir):
    plain = built(gen_recipe(tiny_models["llama"], instr_dir)).task.datasets()["train"]
    packed = built(gen_recipe(tiny_models["llama"], instr_dir, task={"packing": True})).task.datasets()["train"]
    flat = lambda ds, k: [t for row in ds[k] for t in row]  # noqa: E731
    assert flat(packed, "input_ids") == flat(plain, "input_ids") and flat(packed, "labels") == flat(plain, "labels")
    assert all(n == 40 for n in packed["length"][:-1]) and len(packed) < len(plain)


def test_chat_template_used_when_present(tiny_models, instr_dir):
    from peftkit.tasks.causal_lm import CausalLM

    b = built(gen_recipe(tiny_models["llama"], instr_dir))
    tok = b.tokenizer
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]"
    on = CausalLM(b.task.cfg, tok)
    off = CausalLM(b.task.cfg.model_copy(update={"chat_template": False}), tok)
    assert tok.decode(on.prompt_ids("hello world")).startswith("[ user ] hello world")
    assert "user" not in tok.decode(off.prompt_ids("hello world"))


def test_metrics():
    assert G.text_metrics("accuracy", ["Fresh.", "rotten", "no"], [["fresh"], ["x", "rotten"], ["yes"]]) == {
        "accuracy": pytest.approx(2 / 3)}
    refs = [["the cat sat on the mat", "a dog ran"]]
    r = G.text_metrics("rouge", ["a dog ran fast"], refs)
    single = [G.text_metrics("rouge", ["a dog ran fast"], [[x]]) for x in refs[0]]
    assert r["rougeL"] == pytest.approx(max(s["rougeL"] for s in single)) and 0 < r["rouge2"] < 1
    b = G.text_metrics("bleu", ["the cat sat on the mat", "hello there"], [["the cat sat on the mat"], ["hi", "hello there"]])
    assert b["bleu"] == pytest.approx(100.0) and b["chrf"] == pytest.approx(100.0)


def test_causal_lm_trains_and_generates(tiny_models, instr_dir, tmp_path):
    base = fit(gen_recipe(tiny_models["llama"], instr_dir, strategy="full", max_steps=0), tmp_path / "base")
    res = fit(gen_recipe(tiny_models["llama"], instr_dir, strategy="full", max_steps=40, lr=1e-2), tmp_path / "full")
    m0, m = base["metrics"]["eval"], res["metrics"]["eval"]
    assert m["eval_loss"] < m0["eval_loss"] - 1.0  # learnt the answers
    assert m["accuracy"] > m0["accuracy"]
    assert res["metrics"]["primary_metric"] == "accuracy" and m["examples"] == 16
    assert base["speed"]["steps"] == 0 and base["metrics"]["train_loss"] is None


@pytest.mark.slow  # 13 s; packing is covered by test_packing, generation by test_causal_lm_trains_and_generates
def test_sft_cli_lora_packing_rouge(tiny_models, instr_dir, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(gen_recipe(tiny_models["llama"], instr_dir, metric="rouge",
                                             task={"packing": True}, max_steps=3)))
    p = run_cli("train", str(rec), "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    ev = res["metrics"]["eval"]
    assert {"rouge1", "rouge2", "rougeL", "eval_loss", "perplexity"} <= set(ev)
    assert all(isinstance(ev[k], float) for k in ("rouge1", "rougeL", "perplexity"))
    assert res["metrics"]["primary_metric"] == "rougeL" and res["task"]["packing"] is True
    assert res["params"]["trainable"] < res["params"]["total"]


def test_seq2seq_tiny_t5_trains_and_generates(tiny_models, instr_dir, tmp_path):
    rec = gen_recipe(tiny_models["t5"], instr_dir, kind="seq2seq", strategy="full", metric="bleu", max_steps=0)
    base = fit(rec, tmp_path / "base")
    rec["train"]["max_steps"] = 30
    res = fit(rec, tmp_path / "full")
    m0, m = base["metrics"]["eval"], res["metrics"]["eval"]
    assert m["eval_loss"] < m0["eval_loss"] - 1.0
    assert {"bleu", "chrf", "perplexity"} <= set(m) and m["generated_words_mean"] > 0
    assert res["metrics"]["primary_metric"] == "bleu"


def test_seq2seq_lora_on_t5(tiny_models, instr_dir, tmp_path):
    from peft.tuners.lora import LoraLayer

    rec = gen_recipe(tiny_models["t5"], instr_dir, kind="seq2seq", metric="rouge", max_steps=2)
    b = built(rec)
    assert b.head == [] and type(b.strategy.base_model(b.model)).__name__ == "T5ForConditionalGeneration"
    # encoder layers: q, k, v, o, wi, wo; decoder layers add the cross-attention q, k, v, o
    assert sum(isinstance(m, LoraLayer) for m in b.model.modules()) == 2 * 6 + 2 * 10
    res = fit(rec, tmp_path / "lora")
    assert res["params"]["trainable"] < res["params"]["total"] and "rougeL" in res["metrics"]["eval"]


def test_user_errors(tiny_models, instr_dir):
    rec = gen_recipe(tiny_models["llama"], instr_dir, task={"prompt": "{nope} review"})
    with pytest.raises(DataError, match="missing column.*'nope'"):
        built(rec).task.datasets()
    with pytest.raises(RecipeError, match="task.prompt"):
        R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, task={"prompt": "{review"}))
    with pytest.raises(RecipeError, match="max_target_length"):
        R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, task={"max_target_length": 39}))
    with pytest.raises(RecipeError, match="unknown key 'task.packing'"):
        R.from_dict(gen_recipe(tiny_models["t5"], instr_dir, kind="seq2seq", task={"packing": True}))


def test_recipes_validate():
    for name in ("sft/sentiment-lora.yaml", "sft/scitldr-lora.yaml", "ner/lora.yaml", "ner/full.yaml"):
        r = R.load(ROOT / "recipes" / name)
        assert r.task.kind in ("causal_lm", "token_classification")


@pytest.mark.skipif(not (SHARED_DATA / "scitldr").is_dir(), reason="needs ../shared/data/scitldr")
def test_scitldr_rows_multi_reference(tiny_models):
    rec = R.load(ROOT / "recipes/sft/scitldr-lora.yaml",
                 [f"task.data.dir={SHARED_DATA / 'scitldr'}", f"model.name={tiny_models['llama']}",
                  "task.data.max_train_samples=8", "task.data.max_eval_samples=8"])
    from peftkit.model.backbone import load_tokenizer
    from peftkit.tasks import get

    rows = get(rec.task, load_tokenizer(rec.model)).rows()
    prompts, refs = rows["test"]
    assert len(prompts) == 8 and all(2 <= len(r) <= 4 for r in refs)
    assert all(len(r) == 1 for r in rows["train"][1])
    assert prompts[0].startswith("Write a one-sentence TLDR") and ". " in prompts[0]  # sentences joined


@pytest.mark.parametrize("kind, model", [("causal_lm", "llama"), ("seq2seq", "t5")])
def test_truncation_counted_once_per_build_not_by_prediction(tiny_models, instr_dir, kind, model):
    rec = gen_recipe(tiny_models[model], instr_dir, kind=kind,
                     task={"prompt": "review: {review} {review} {review} sentiment:", "max_length": 16,
                           "max_target_length": 4})
    task = built(rec).task
    task.datasets()
    n = task.info()["truncated_examples"]
    assert n > 0
    task.datasets()  # built again (export --verify, a second evaluation): the same examples, not twice as many
    assert task.info()["truncated_examples"] == n
    task.prompt_batch(["review: " + "word " * 40 + "sentiment:"] * 3)  # what predict does
    assert task.info()["truncated_examples"] == n
