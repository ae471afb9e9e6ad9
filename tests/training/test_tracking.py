"""Experiment trackers for real: MLflow on a local file store, W&B offline, compare grouping."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe
from peftkit import recipe as R
from peftkit.errors import RecipeError, UserError
from peftkit.training.tracking import Tracking, compare_group, flatten, resolve


def _train(tiny_models, sentiment_dir, out, report_to):
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    d = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", log_every=1)
    d["output"] = {"report_to": report_to}
    return Trainer(build(R.from_dict(d)), out).fit()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    for k in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(k, raising=False)
    return uri


def test_mlflow_file_store_params_metrics_artifacts(tiny_models, sentiment_dir, tmp_path, mlflow_store):
    from mlflow import MlflowClient

    res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["mlflow"])
    client = MlflowClient(mlflow_store)
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["strategy.name"] == "lora" and float(p["train.lr"]) == 1e-3 and p["recipe_hash"] == res["run"]["recipe_hash"]
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3, 4]
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    acc = client.get_metric_history(run.info.run_id, "eval_final/accuracy")
    assert acc[-1].value == pytest.approx(res["metrics"]["eval"]["accuracy"])
    assert "result.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_compare_group_makes_mlflow_parent(tiny_models, sentiment_dir, tmp_path, mlflow_store, monkeypatch):
    from mlflow import MlflowClient

    report = tmp_path / "report.md"
    report.write_text("# report\n")
    out = tmp_path / "cmp" / "lora" / "seed0"
    with compare_group("cmp-group", {"mlflow"}, lambda: [report]):
        _train(tiny_models, sentiment_dir, out, ["mlflow"])
    client = MlflowClient(mlflow_store)
    (exp,) = [e for e in client.search_experiments() if e.name == "cmp-group"]
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"cmp-group", "lora/seed0"}
    parent = runs["cmp-group"]
    assert runs["lora/seed0"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report.md"]


def test_wandb_offline_run_files(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["wandb"])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # The offline record stream `wandb sync` uploads (protobuf records: keys and JSON values as text).
    (stream,) = run_dir.glob("run-*.wandb")
    data = stream.read_bytes()
    for key in ("loss", "lr", "eval_final/accuracy", "strategy.name", "train.lr", "recipe_hash", "result.json"):
        assert key.encode() in data, key
    assert json.dumps(res["metrics"]["eval"]["accuracy"]).encode() in data
    assert res["run"]["recipe_hash"].encode() in data


def test_report_to_resolution_and_old_key():
    assert resolve([]) == []
    with pytest.raises(UserError, match="output.report_to: comet_ml not installed"):
        resolve(["comet_ml"])
    with pytest.raises(RecipeError, match="output.tensorboard was replaced by output.report_to"):
        R.from_dict({"output": {"tensorboard": True}})
    with pytest.raises(RecipeError, match="report_to"):
        R.from_dict({"output": {"report_to": ["nope"]}})
    assert flatten({"a": {"b": 1, "c": None, "d": [1, 2]}}) == {"a.b": 1, "a.c": "None", "a.d": "[1, 2]"}


def test_no_tracker_is_no_accelerator_tracking(tiny_models, sentiment_dir):
    d = tiny_recipe(tiny_models["bert"], sentiment_dir)
    d["output"] = {"report_to": []}
    assert Tracking(R.from_dict(d), "/tmp/x").accelerator_kwargs() == {}
