"""Export and predict beyond classification: token classification, causal LM, seq2seq (tiny models)."""

import io
import json
import shutil
import sys

import pytest
import torch
from conftest import gen_recipe, instr_dir  # noqa: F401  (fixture)
from conftest import ner_dir, ner_recipe  # noqa: F401  (fixture)

from peftkit import cli
from peftkit.export import merge as E
from peftkit import recipe as R
from peftkit.errors import UserError
from peftkit.export.predict import Predictor

CHAT = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]"


def _train(rec: dict, out):
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    Trainer(build(R.from_dict(rec)), out).fit()
    return out


def _rows(d, split="test", n=8):
    return [json.loads(x) for x in (d / f"{split}.jsonl").read_text().splitlines()][:n]


def _eval_preds(run, n):
    """The run's own evaluation predictions (task.eval_step) on its first ``n`` eval examples."""
    b = E.load_trained(run)
    return [p for batch in E.eval_batches(b, n) for p in b.task.eval_step(b.model, batch)[0]]


@pytest.fixture(scope="module")
def ner_run(tiny_models, ner_dir, tmp_path_factory):  # noqa: F811
    rec = ner_recipe(tiny_models["bert"], ner_dir, "lora")
    rec["train"].update(max_steps=6, lr=1e-2)  # LoRA weights far enough from zero that dropping them would show
    return _train(rec, tmp_path_factory.mktemp("ner") / "run")


@pytest.fixture(scope="module")
def sft_run(tiny_models, instr_dir, tmp_path_factory):  # noqa: F811
    """LoRA on the tiny Llama whose tokenizer has a chat template: the export must prompt the same way."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sft")
    model = shutil.copytree(tiny_models["llama"], root / "llama-chat")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT
    tok.save_pretrained(model)
    return _train(gen_recipe(model, instr_dir, max_steps=6, lr=1e-2), root / "run")


def _error_line(err: str) -> str:
    """The CLI's one-line error (in-process, transformers' loading progress bars may come before it)."""
    *before, last = err.strip().splitlines()
    assert last.startswith("peftkit: error: ") and not any("rror" in x or "Traceback" in x for x in before), err
    return last


def _check_entities(row):
    covered = set()
    for e in row["entities"]:
        a, b = e["start"], e["end"]
        assert e["words"] == row["words"][a:b] and 0 < e["score"] <= 1
        assert row["tags"][a][2:] == e["type"] and all(t == "I-" + e["type"] for t in row["tags"][a + 1 : b])
        covered |= set(range(a, b))
    assert covered == {i for i, t in enumerate(row["tags"]) if t != "O"}  # every tagged word in one entity


def test_token_classification_export_and_predict(ner_run, ner_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    out = tmp_path / "merged"
    v = E.export(ner_run, out, verify=True, verify_examples=16)["verify"]
    assert v["passed"] and v["argmax_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-4, v
    assert v["positions"] > v["examples"] == 16  # compared per token
    assert v["metrics"]["trained"] == v["metrics"]["exported"]
    labels = json.loads((ner_run / "result.json").read_text())["task"]["labels"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForTokenClassification"] and list(cfg["id2label"].values()) == labels

    words = [r["tokens"] for r in _rows(ner_dir, n=16)] + [["Alice", "Zorblaxqui", "went"] * 12]  # the last is cut
    run_p, exp_p = Predictor.load(ner_run).predict(words), Predictor.load(out).predict(words)
    # Plain transformers, first sub-word rule written out here; words past max_length are O.
    model, tok = AutoModelForTokenClassification.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    enc = tok(words, is_split_into_words=True, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits.argmax(-1)
    plain = []
    for i, ws in enumerate(words):
        first = {}
        for j, w in enumerate(enc.word_ids(i)):
            first.setdefault(w, j)
        plain.append([labels[ids[i, first[w]]] if w in first else "O" for w in range(len(ws))])
    assert [p["tags"] for p in exp_p] == plain == [p["tags"] for p in run_p]
    for a, b in zip(exp_p, run_p):
        assert [e["score"] for e in a["entities"]] == pytest.approx([e["score"] for e in b["entities"]], abs=1e-5)
        _check_entities(a)
    assert exp_p[-1]["truncated_words"] > 0 and "truncated_words" not in exp_p[0]
    # The run's evaluation tags the same words the same way.
    assert [p["tags"] for p in run_p[:16]] == _eval_preds(ner_run, 16)
    # A text is split on whitespace; without peftkit.json the kind comes from the model class.
    text = " ".join(words[0])
    assert Predictor.load(out).predict(text)[0]["tags"] == exp_p[0]["tags"]
    (out / "peftkit.json").unlink()
    bare = Predictor.load(out)
    assert bare.kind == "token_classification" and bare.predict([words[0]]) == exp_p[:1]


def test_causal_lm_export_and_predict(sft_run, instr_dir, tiny_models, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    v = E.export(sft_run, out, verify=True, verify_examples=16)["verify"]
    assert v["passed"] and v["argmax_agreement"] == 1.0 and v["max_abs_logit_diff"] <= 1e-4, v
    assert v["positions"] > v["examples"] == 16  # the response-token positions
    t, x = v["metrics"]["trained"], v["metrics"]["exported"]
    assert t["accuracy"] == x["accuracy"] and t["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    meta = json.loads((out / "peftkit.json").read_text())["task_config"]
    assert meta["prompt"] == "review: {review} sentiment:" and meta["chat_template"] is True

    rows = _rows(instr_dir)
    inputs = [{"review": r["review"]} for r in rows]
    exported = Predictor.load(out)
    assert exported.task.uses_chat_template() and exported.task.cfg.max_new_tokens == 3
    got = exported.predict(inputs)
    assert all(isinstance(g["text"], str) for g in got)
    assert Predictor.load(sft_run).predict(inputs) == got
    assert [p["text"] for p in _eval_preds(sft_run, 8)] == [g["text"] for g in got]  # as evaluation generates
    assert exported.predict([" ".join(r["review"]) for r in rows]) == got  # a text fills the one placeholder

    # Plain transformers: the chat template by hand, greedy decoding of 3 tokens.
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    one = exported.predict(inputs[:3], batch_size=1)
    for r, g in zip(rows, one):
        text = tok.apply_chat_template([{"role": "user", "content": f"review: {' '.join(r['review'])} sentiment:"}],
                                       add_generation_prompt=True, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=3, do_sample=False, num_beams=1,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            moved = (model(**enc).logits - base(**enc).logits).abs().max()
        assert tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == g["text"]
        assert moved > 1e-3  # the merged LoRA deltas are in the exported weights


def test_seq2seq_export_and_predict(tiny_models, instr_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = _train(gen_recipe(tiny_models["t5"], instr_dir, kind="seq2seq", max_steps=4, lr=1e-2), tmp_path / "run")
    out = tmp_path / "merged"
    v = E.export(run, out, verify=True, verify_examples=8)["verify"]
    assert v["passed"] and v["argmax_agreement"] == 1.0 and v["positions"] > v["examples"], v
    rows = _rows(instr_dir)
    texts = [" ".join(r["review"]) for r in rows]
    got = Predictor.load(out).predict(texts)
    assert Predictor.load(run).predict(texts) == got
    assert [p["text"] for p in _eval_preds(run, 8)] == [g["text"] for g in got]
    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    for text, g in zip(texts[:2], Predictor.load(out).predict(texts[:2], batch_size=1)):
        with torch.no_grad():
            enc = tok(f"review: {text} sentiment:", return_tensors="pt", return_token_type_ids=False)
            gen = model.generate(**enc, max_new_tokens=3,
                                 do_sample=False, num_beams=1, eos_token_id=tok.eos_token_id)
        assert tok.decode(gen[0], skip_special_tokens=True).strip() == g["text"]


def test_kind_from_the_model_class(tiny_models):
    for name, kind in (("llama", "causal_lm"), ("gpt2", "causal_lm"), ("t5", "seq2seq")):
        p = Predictor.load(tiny_models[name])  # saved by transformers, no peftkit.json: default task settings
        assert p.kind == kind and p.task.cfg.prompt == "{prompt}"
        (g,) = p.predict(["hello world"], max_new_tokens=2)
        assert set(g) == {"text"} and 0 < len(g["text"].split()) <= 2
    with pytest.raises(UserError, match="cannot tell the task of model class 'BertModel'"):
        Predictor.load(tiny_models["bert"])


def test_cli_predict_json_lines(ner_run, sft_run, capsys, monkeypatch):
    capsys.readouterr()
    assert cli.main(["predict", str(ner_run), "Alice Zorblaxqui met Bob", "in Paris"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["input"] for r in rows] == ["Alice Zorblaxqui met Bob", "in Paris"]
    assert rows[0]["words"] == ["Alice", "Zorblaxqui", "met", "Bob"] and len(rows[0]["tags"]) == 4
    monkeypatch.setattr(sys, "stdin", io.StringIO('["in", "Paris"]\n\n'))
    assert cli.main(["predict", str(ner_run), "-", "--json-input"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert row["input"] == ["in", "Paris"] and row["tags"] == rows[1]["tags"]

    assert cli.main(["predict", str(sft_run), "good fun film", "--json"]) == 0
    (a,) = json.loads(capsys.readouterr().out)
    assert a["input"] == "good fun film" and isinstance(a["text"], str)
    assert cli.main(["predict", str(sft_run), '{"review": ["good", "fun", "film"]}', "--json-input"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == a["text"]
    assert cli.main(["predict", str(sft_run), "good fun film", "--max-new-tokens", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["text"].split()) <= 1
    assert cli.main(["predict", str(ner_run), "in Paris", "--max-new-tokens", "1"]) == 2
    assert "max_new_tokens applies to causal_lm and seq2seq" in capsys.readouterr().err
    for bad, msg in (("{nope", "--json-input: not JSON"), ('{"text": "x"}', "lacks column(s) review"),
                     ('["a", "b"]', "turn 1: expected an object with 'role' and 'content'"),  # a list: a conversation
                     ('3', "takes a text or an object")):
        assert cli.main(["predict", str(sft_run), bad, "--json-input"]) == 2
        assert msg in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize("model, kind", [("llama", "causal_lm"), ("t5", "seq2seq")])
def test_bitfit_refuses_bias_free_generators(model, kind, tiny_models, instr_dir, tmp_path, capsys):  # noqa: F811
    import yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(gen_recipe(tiny_models[model], instr_dir, kind=kind, strategy="bitfit")))
    capsys.readouterr()
    assert cli.main(["train", str(rec), "--out", str(tmp_path / "run")]) == 2
    err = _error_line(capsys.readouterr().err)
    cls = {"llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration"}[model]
    assert f"'bitfit': {cls} has no bias parameters (" in err and "use ia3 or lora" in err
    assert not (tmp_path / "run").exists()


def test_classification_predict_uses_the_text_pair(tiny_models, tmp_path):
    from conftest import sentiment_rows, tiny_recipe, write_csv

    from peftkit.model.build import build

    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        rows = sentiment_rows(16, seed)
        write_csv(tmp_path / f"{split}.csv", [{"premise": a["text"], "hypothesis": b["text"], "label": a["label"]}
                                              for a, b in zip(rows, rows[::-1])])
    rec = tiny_recipe(tiny_models["bert"], tmp_path, "lora")
    rec["task"].update(text_column="premise", text_pair_column="hypothesis")
    b = build(R.from_dict(rec))
    b.model.eval()
    ds, raw = b.task.datasets()["test"], b.task.raw_splits()["test"]
    batch = b.task.collate([ds[i] for i in range(6)])
    with torch.no_grad():
        probs = b.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.softmax(-1)
    pred = Predictor(b.model, b.tokenizer, "classification", rec["task"]["max_length"], b.task)
    objects = [{"premise": raw[i]["premise"], "hypothesis": raw[i]["hypothesis"]} for i in range(6)]
    got = pred.predict(objects, batch_size=4)
    assert pred.predict([[o["premise"], o["hypothesis"]] for o in objects]) == got  # [text, pair] the same
    assert [g["score"] for g in got] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    assert [g["label"] for g in got] == [b.task.labels[i] for i in probs.argmax(-1).tolist()]
    with pytest.raises(UserError, match=r"takes a pair \[premise, hypothesis\]"):
        pred.predict(["a premise alone"])
    with pytest.raises(UserError, match="lacks column.*hypothesis"):
        pred.predict([{"premise": "a premise alone"}])
