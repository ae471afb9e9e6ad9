"""Search trials in one process (peftkit.runs.trial_batch): the same numbers as alone, failures kept apart."""

from __future__ import annotations

import json

from conftest import tiny_recipe
from peftkit import cli
from peftkit.runs import search, trial_batch
from peftkit import recipe as R
from peftkit.runs import executors
from peftkit.runs.spec import RunSpec
from peftkit.io import atomic_write_text


def trial(tmp_path, tiny_models, sentiment_dir, strategy, name, **data):
    rec = tiny_recipe(tiny_models["bert"], sentiment_dir, strategy, max_steps=6, log_every=1, stop_at=0.5,
                      checkpoint_every=None)
    rec["task"]["data"].update(data)
    rec["output"] = {"report_to": []}
    return RunSpec(name, 0, R.from_dict(rec), tmp_path / "out" / name / "search" / "lr1e-03" / "seed0")


def losses(d):
    return [r["loss"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_batch_gives_the_numbers_of_a_run_alone_and_keeps_failures_apart(tiny_models, sentiment_dir, tmp_path):
    alone = trial(tmp_path, tiny_models, sentiment_dir, "lora", "alone")
    f = alone.dir.parent / "seed0.yaml"
    alone.dir.mkdir(parents=True)
    atomic_write_text(f, R.dump_yaml(alone.recipe))
    assert cli.main(["train", str(f), "--out", str(alone.dir), "--force"]) == 0

    runs = [trial(tmp_path, tiny_models, sentiment_dir, "prefix", "prefix"),
            trial(tmp_path, tiny_models, sentiment_dir, "lora", "broken", dir=str(tmp_path / "nowhere")),
            trial(tmp_path, tiny_models, sentiment_dir, "ia3", "ia3"),
            trial(tmp_path, tiny_models, sentiment_dir, "lora", "lora")]
    batch = trial_batch.TrialBatch(runs, tmp_path / "batch", "rung 1/1")
    assert batch.runs_in_process == 4 and not batch.done()
    assert trial_batch.main([str(batch.write_manifest())]) == 1  # one trial failed; the others trained
    prefix, broken, ia3, lora = runs
    assert prefix.done() and ia3.done() and lora.done() and not batch.done()
    err = json.loads((broken.dir / "error.json").read_text())
    assert "nowhere" in err["message"] and err["variant"] == "broken" and "train.log" not in err["message"]
    a, b = (json.loads((d / "result.json").read_text()) for d in (alone.dir, lora.dir))
    # after a prefix, a failed and an IA3 trial, with the tokenized data shared: the same run
    assert b["metrics"]["eval"]["accuracy"] == a["metrics"]["eval"]["accuracy"]
    assert losses(lora.dir) == losses(alone.dir) and len(losses(alone.dir)) == 3
    assert "skipped" in b["memory"]["estimate"]  # a rung has no estimate (its final run has)
    assert "done" in (lora.dir / "train.log").read_text()  # each trial's output in its own run dir


def test_trials_of_a_dead_batch_run_again_one_process_each(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    from conftest import in_process

    runs = [trial(tmp_path, tiny_models, sentiment_dir, "lora", v) for v in ("a", "b")]
    seen = []

    def dies(items, pool=None, echo=None):  # the batch process is killed before any trial wrote a record
        seen.append([type(x).__name__ for x in items])
        if isinstance(items[0], trial_batch.TrialBatch):
            return [{"message": "killed"}]
        return in_process(items)

    monkeypatch.setattr(search, "_run_all", dies)
    errs = search._train_trials(runs, None, executors.config(), tmp_path / "rung1", "rung 1/1", echo=lambda *_: None)
    assert errs == [None, None] and all(r.done() for r in runs)
    assert seen == [["TrialBatch"], ["RunSpec", "RunSpec"]]


def test_groups_keep_order_and_balance():
    assert trial_batch.groups(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert trial_batch.groups([1, 2], 5) == [[1], [2]] and trial_batch.groups([1, 2, 3], 1) == [[1, 2, 3]]
