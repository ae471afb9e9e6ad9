"""Conversations for causal-LM tasks: chat templates, assistant-only labels, formats, bad rows."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import built, fit, gen_recipe, run_cli

from peftkit.errors import DataError
from peftkit.tasks import chat

# A template whose pieces tokenize to distinct word-pieces with the tiny (BERT vocabulary) tokenizer.
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello friend"}, {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue"}]


def sharegpt(conv):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in conv]


def rows(n, seed=0):
    """Two-turn conversations with a system prompt: the answers are the review's label."""
    from conftest import sentiment_rows

    out = []
    for a, b in zip(sentiment_rows(n, seed), sentiment_rows(n, seed + 100)):
        out.append([{"role": "system", "content": "answer pos or neg"},
                    {"role": "user", "content": a["text"]}, {"role": "assistant", "content": a["label"]},
                    {"role": "user", "content": b["text"]}, {"role": "assistant", "content": b["label"]}])
    return out


def chat_model(tiny_models, tmp_path):
    """The tiny llama with a chat template (its BERT tokenizer has none)."""
    from transformers import AutoTokenizer

    d = shutil.copytree(tiny_models["llama"], tmp_path / "llama-chat")
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


def write_split_files(d, fmt="messages", n=(48, 8, 8), column=None):
    d.mkdir(exist_ok=True)
    for split, k, seed in zip(("train", "validation", "test"), n, (0, 1, 2)):
        with open(d / f"{split}.jsonl", "w") as f:
            for conv in rows(k, seed):
                turns = sharegpt(conv) if fmt == "sharegpt" else conv
                f.write(json.dumps({column or chat.COLUMN[fmt]: turns}) + "\n")
    return d


def chat_recipe(model, data, **task):
    rec = gen_recipe(model, data, task={"max_length": 64, **task})
    del rec["task"]["prompt"], rec["task"]["response_column"]
    return rec


def test_exact_label_mask_single_and_multi_turn(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model(tiny_models, tmp_path))
    pieces = [("system : be brief [SEP] user : hi there [SEP] assistant : ", False), ("hello friend [SEP] ", True),
              ("user : name a colour [SEP] assistant : ", False), ("blue [SEP] ", True)]
    tokens = [(t, lab) for text, lab in pieces for t in tok.tokenize(text)]
    enc = chat.encode(tok, CONV, max_length=64)
    assert tok.convert_ids_to_tokens(enc.ids) == [t for t, _ in tokens]
    assert [y != -100 for y in enc.train_labels] == [lab for _, lab in tokens]
    assert all(y in (-100, x) for x, y in zip(enc.ids, enc.train_labels))
    last = len(tok.tokenize("blue [SEP] "))  # evaluation: the last assistant turn only
    assert [y != -100 for y in enc.eval_labels] == [False] * (len(tokens) - last) + [True] * last
    assert enc.prompt_ids == enc.ids[:-last] and enc.target == "blue"
    one = chat.encode(tok, CONV[:3], max_length=64)  # single turn: the first two pieces, same mask
    n1 = sum(len(tok.tokenize(t)) for t, _ in pieces[:2])
    assert one.ids == enc.ids[:n1] and one.train_labels == enc.train_labels[:n1] == one.eval_labels
    cut = chat.encode(tok, CONV, max_length=n1 + 3)  # the second turn does not fit: dropped, counted
    assert cut.truncated and cut.ids == one.ids and cut.target == "hello friend"
    with pytest.raises(chat.BadConversation, match="first assistant turn ends at token"):
        chat.encode(tok, CONV, max_length=n1 - 1)


def test_sharegpt_roles_mapped():
    assert chat.normalize(sharegpt(CONV), "sharegpt") == CONV
    assert chat.detect(["id", "conversations"]) == "sharegpt" and chat.detect(["messages"]) == "messages"
    assert chat.detect(["prompt", "response"]) == "none"


@pytest.mark.parametrize("conv, why", [
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "turn 2 (assistant): empty content"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "no assistant turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "before any user turn"),
    ("hello", "not a list of turns"),
])
def test_malformed_conversations(conv, why):
    with pytest.raises(chat.BadConversation, match=re.escape(why)):
        chat.normalize(conv, "messages")


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_auto_detects_and_says_so(tiny_models, tmp_path, capsys, fmt):
    data = write_split_files(tmp_path / "d", fmt, n=(8, 4, 4))
    b = built(chat_recipe(chat_model(tiny_models, tmp_path), data))
    ds = b.task.datasets()
    assert b.task.chat_format == fmt and b.task.info()["chat_format"] == fmt
    assert f"task.chat_format=auto: column '{chat.COLUMN[fmt]}' found" in capsys.readouterr().err
    ex = ds["test"][0]
    assert ex["refs"] == [rows(4, 2)[0][-1]["content"]] and ex["input_ids"][: len(ex["prompt_ids"])] == ex["prompt_ids"]


def test_bad_conversations_counted_or_one_line(tiny_models, tmp_path):
    data = write_split_files(tmp_path / "d", n=(8, 4, 4))
    with open(data / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "q " * 80}, {"role": "assistant", "content": "a"}]})
                + "\n")
    model = chat_model(tiny_models, tmp_path)
    with pytest.raises(DataError, match=r"task.data.train \(.*train.jsonl\): row 9: turn 2: unknown role 'robot'"):
        built(chat_recipe(model, data)).task.datasets()
    rec = chat_recipe(model, data)
    rec["task"]["data"]["bad_rows"] = "skip"
    b = built(rec)
    assert len(b.task.datasets()["train"]) == 8
    info = b.task.info()["bad_rows"]
    assert info["skipped"] == {"train": 2} and "row 9: turn 2: unknown role 'robot'" in b.task.notes()[-1]
    lines = (data / "train.jsonl").read_text().splitlines()  # the too-long one alone: its own line
    (data / "train.jsonl").write_text("\n".join(lines[:8] + lines[9:]) + "\n")
    with pytest.raises(DataError, match=r"row 9: the first assistant turn ends at token \d+, past task.max_length=64"):
        built(chat_recipe(model, data)).task.datasets()


def test_no_chat_template_is_one_line(tiny_models, tmp_path):
    data = write_split_files(tmp_path / "d", n=(8, 4, 4))
    with pytest.raises(DataError, match="the tokenizer has no chat template, and task.chat_format=messages"):
        built(chat_recipe(tiny_models["llama"], data)).task.datasets()


def test_packing_and_padding_free_keep_turn_borders(tiny_models, tmp_path):
    from peftkit.step.packing import PaddingFree

    data = write_split_files(tmp_path / "d", n=(16, 4, 4))
    model = chat_model(tiny_models, tmp_path)
    plain = built(chat_recipe(model, data, max_length=128)).task.datasets()["train"]
    packed = built(chat_recipe(model, data, max_length=128, packing=True)).task.datasets()["train"]
    assert len(packed) < len(plain)
    # every block is whole conversations, in order: the labels of each conversation unchanged
    k = 0
    for ids, labels in zip(packed["input_ids"], packed["labels"]):
        n = 0
        while n < len(ids):
            assert ids[n : n + plain[k]["length"]] == plain[k]["input_ids"]
            assert labels[n : n + plain[k]["length"]] == plain[k]["labels"]
            n, k = n + plain[k]["length"], k + 1
    assert k == len(plain)
    feats = [plain[i] for i in range(3)]
    batch = PaddingFree()(feats)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, feats[0]["length"], feats[0]["length"] + feats[1]["length"]]
    flat = [y for f in feats for y in [-100] + f["labels"][1:]]  # each sequence's first label is not predicted
    assert batch["labels"][0].tolist() == flat


def test_chat_trains_evaluates_predicts(tiny_models, tmp_path):
    data = write_split_files(tmp_path / "d", n=(48, 8, 8))
    model = chat_model(tiny_models, tmp_path)
    rec = chat_recipe(model, data, forgetting={"sequences": 4, "max_length": 32})
    rec["train"].update(max_steps=4, batch_size=8)
    res = fit(rec, tmp_path / "run")
    assert res["task"]["chat_format"] == "messages" and res["metrics"]["eval"]["examples"] == 8
    f = res["forgetting"]
    assert f["sequences"] == 4 and f["rise"] == pytest.approx(f["loss_after"] - f["loss_before"])
    from peftkit.export.predict import Predictor

    out = Predictor.load(tmp_path / "run").predict([rows(1, 5)[0][:4], {"messages": rows(1, 6)[0][:2]}], batch_size=2)
    assert len(out) == 2 and all(isinstance(o["text"], str) for o in out)


@pytest.mark.slow  # CLI train + export --verify: ~18 s each on a quiet 2-core machine
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_chat_file_train_export_verify(tiny_models, tmp_path, fmt):
    import yaml

    data = write_split_files(tmp_path / "d", fmt, n=(16, 4, 4))
    rec = chat_recipe(chat_model(tiny_models, tmp_path), data, chat_format=fmt,
                      forgetting={"sequences": 2, "max_length": 16})
    rec["train"]["max_steps"] = 4
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    p = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["task"]["chat_format"] == fmt and "rise" in res["forgetting"]
    p = run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "exp"), "--verify")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "exp" / "verify.json").read_text())["passed"]


def test_builtin_rotten_tomatoes_chat():
    ds, group = chat.rotten_tomatoes_chat("builtin:rotten-tomatoes-chat")
    assert group == "movie_name" and len(ds) > 1000
    convs = ds["messages"][:30]
    assert {len(c) for c in convs} == {3, 5, 7}  # system + 1, 2 or 3 (user, assistant) turns
    for c in convs:
        msgs = chat.normalize(c, "messages")
        assert msgs[0] == {"role": "system", "content": chat.SYSTEM}
        assert all(m["content"] in ("fresh", "rotten") for m in msgs if m["role"] == "assistant")
