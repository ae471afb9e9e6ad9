"""Token classification: CoNLL/JSONL reading, sub-word label alignment, seqeval metrics, training."""

import json

import pytest
import yaml
from conftest import ROOT, SHARED_DATA, ner_recipe, ner_rows, run_cli

from peftkit import recipe as R
from peftkit.errors import DataError
from peftkit.tasks.data import read_conll

WNUT = SHARED_DATA / "wnut17"


def built(rec):
    from peftkit.model.build import build

    return build(R.from_dict(rec))


def test_read_conll_breaks_and_columns(tmp_path):
    f = tmp_path / "x.conll"
    # a lone tab is a sentence break too; -DOCSTART- is skipped; the last column is the tag
    f.write_text("-DOCSTART-\tO\n\nParis\tB-location\nis\tO\n\t\nBob\tNNP\tB-person\n \nok\tO")
    ds = read_conll(f)
    assert ds["tokens"] == [["Paris", "is"], ["Bob"], ["ok"]]
    assert ds["tags"] == [["B-location", "O"], ["B-person"], ["O"]]
    (tmp_path / "bad.conll").write_text("a\tO\nlonely\n")
    with pytest.raises(DataError, match="bad.conll: line 2"):
        read_conll(tmp_path / "bad.conll")


@pytest.mark.skipif(not WNUT.is_dir(), reason="needs ../shared/data/wnut17")
def test_wnut17_files_read_whole():
    n = {f: len(read_conll(WNUT / f)) for f in ("wnut17train.conll", "emerging.dev.conll", "emerging.test.annotated")}
    assert n == {"wnut17train.conll": 3394, "emerging.dev.conll": 1009, "emerging.test.annotated": 1287}


def test_first_subword_labelled_and_truncation_counted(tiny_models, ner_dir):
    b = built(ner_recipe(tiny_models["bert"], ner_dir, max_length=12))
    task, tok = b.task, b.tokenizer
    ds = task.datasets()
    assert task.labels == ["O", "B-location", "B-person", "I-person"]
    assert b.head == ["classifier"]
    ex = ds["train"][0]
    words = tok(task.raw_splits()["train"][0]["tokens"], is_split_into_words=True, truncation=True, max_length=12)
    wid = words.word_ids()
    for j, w in enumerate(wid):
        first = w is not None and (j == 0 or wid[j - 1] != w)
        assert (ex["labels"][j] != -100) == first
    assert len(tok.tokenize("Zorblaxqui")) > 1  # the fixture really has multi-sub-word words
    # words cut off by max_length come back as gold tags in the references (predicted as O)
    preds, refs = task.eval_step(b.model, task.collate([ds["test"][i] for i in range(len(ds["test"]))]))
    gold = task.raw_splits()["test"]["tags"]
    assert refs == gold and [len(p) for p in preds] == [len(g) for g in gold]
    assert task.info()["truncated_examples"] > 0


def test_metrics_entity_level_per_type(tiny_models, ner_dir):
    task = built(ner_recipe(tiny_models["bert"], ner_dir)).task
    refs = [["B-person", "I-person", "O", "B-location"], ["O", "B-person"]]
    assert task.metrics(refs, refs)["f1"] == 1.0
    m = task.metrics([["B-person", "O", "O", "B-location"], ["O", "B-person"]], refs)
    # the first person is cut short: 2 of 3 predicted entities right, 2 of 3 found
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["location_f1"] == 1.0 and m["person_f1"] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_ner_trains(tiny_models, ner_dir, tmp_path, strategy):
    from peftkit.training.trainer import Trainer

    rec = ner_recipe(tiny_models["bert"], ner_dir, strategy)
    rec["train"].update(max_steps=30, lr=5e-3, log_every=5)
    b = built(rec)
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)  # the new head always trains
    assert any("lora_A" in n for n in trainable) == (strategy == "lora")
    res = Trainer(b, tmp_path / strategy).fit()
    m = res["metrics"]["eval"]
    assert res["metrics"]["primary_metric"] == "f1" and {"person_f1", "location_f1"} <= set(m)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / strategy / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses[-1] < losses[0]
    if strategy == "full":  # a random tiny backbone: only full fine-tuning reliably finds entities in 30 steps
        assert m["f1"] > 0.15


def test_errors_name_file_and_row(tiny_models, ner_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    rec = ner_recipe(tiny_models["bert"], tmp_path, files=("train.jsonl", "train.jsonl", "train.jsonl"))
    with pytest.raises(DataError, match=r"train.jsonl\): row 1: .*same length"):
        built(rec).task.datasets()
    (tmp_path / "t2.jsonl").write_text(json.dumps({"tokens": ["a"], "tags": ["B-alien"]}) + "\n")
    rec = ner_recipe(tiny_models["bert"], ner_dir, files=("train.jsonl", "validation.jsonl", str(tmp_path / "t2.jsonl")),
                     labels=["O", "B-person", "I-person", "B-location"])
    with pytest.raises(DataError, match="task.data.test .*row 1: tag 'B-alien' not in the tag set"):
        built(rec).task.datasets()


@pytest.mark.skipif(not WNUT.is_dir(), reason="needs ../shared/data/wnut17")
@pytest.mark.slow  # 12 s; NER training is covered in-process in this file
def test_wnut17_recipe_cli_on_a_few_rows(tiny_models, tmp_path):
    data = yaml.safe_load((ROOT / "recipes/ner/lora.yaml").read_text())
    data["model"]["name"] = str(tiny_models["bert"])
    data["task"]["data"].update(dir=str(WNUT), max_train_samples=48, max_eval_samples=24)
    data["train"] = {"max_steps": 2, "batch_size": 16, "progress": False, "precision": "fp32"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    p = run_cli("train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    types = ("person", "location", "group", "creative-work", "corporation", "product")
    assert res["metrics"]["eval"]["examples"] == 24 and res["task"]["labels"][0] == "O"
    assert set(res["task"]["labels"]) <= {"O"} | {f"{p}-{t}" for p in "BI" for t in types}
    assert "creative-work_f1" in res["metrics"]["eval"] or res["metrics"]["eval"]["f1"] == 0.0


def test_truncation_counted_once_per_build(tiny_models, ner_dir):
    task = built(ner_recipe(tiny_models["bert"], ner_dir, max_length=12)).task
    task.datasets()
    n = task.info()["truncated_examples"]
    assert n > 0
    task.datasets()
    assert task.info()["truncated_examples"] == n


def test_eval_step_on_a_batch_without_tails(tiny_models, ner_dir):
    # The train split carries no "tail" (words cut by max_length); a batch of more examples
    # than tokens per example must still get one (empty) tail per example.
    b = built(ner_recipe(tiny_models["bert"], ner_dir))
    task = b.task
    ds = task.datasets()["train"]
    batch = task.collate([ds[i] for i in range(len(ds))])
    assert "tail" not in batch and batch["input_ids"].shape[0] > batch["input_ids"].shape[1]
    preds, refs = task.eval_step(b.model, batch)
    assert refs == task.raw_splits()["train"]["tags"] and [len(p) for p in preds] == [len(r) for r in refs]


CONLL = {  # rows without a token, as real files carry them: "\tO" and "  \tO"
    "train.conll": "Paris\tB-location\nis\tO\n\tO\nnice\tO\n\nBob\tB-person\n  \tO\nsang\tO\n",
    "validation.conll": "Bob\tB-person\n\tO\nleft\tO\n",
    "test.conll": "Alice\tB-person\nstayed\tO\n",
}


def test_conll_rows_without_a_token(tiny_models, tmp_path, capsys):
    from peftkit import cli

    for name, text in CONLL.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=r"train.conll: line 3: expected 'token<TAB>tag', got 'O'"):
        read_conll(tmp_path / "train.conll")
    rec = ner_recipe(tiny_models["bert"], tmp_path, files=tuple(CONLL), labels=["O", "B-location", "B-person"])
    rec["train"].update(max_steps=1, batch_size=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.conll: line 3: expected 'token<TAB>tag', got 'O'" in err and "bad_rows: skip" in err, err
    assert not (tmp_path / "run").exists()

    rc = cli.main(["train", str(tmp_path / "r.yaml"), "task.data.bad_rows=skip", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [x for x in err.splitlines() if "bad row" in x]
    assert len(warned) == 1 and "skipped 3 bad row(s)" in warned[0] and "train 2, validation 1" in warned[0], err
    res = json.loads((tmp_path / "run" / "result.json").read_text())
    assert res["task"]["bad_rows"] == {"policy": "skip", "skipped": {"train": 2, "validation": 1}, "skipped_total": 3}
    task = built({**rec, "task": {**rec["task"], "data": {**rec["task"]["data"], "bad_rows": "skip"}}}).task
    assert task.raw_splits()["train"]["tokens"] == [["Paris", "is", "nice"], ["Bob", "sang"]]
    assert task.raw_splits()["validation"]["tags"] == [["B-person", "O"]]
