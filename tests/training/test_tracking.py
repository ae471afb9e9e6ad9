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


# -- trackers as their users set them up (issue #28) ---------------------------------------
def _clean_mlflow_env(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
              "MLFLOW_TAGS", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(k, raising=False)


def _read_back(uri: str, res: dict):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe_hash"] == res["run"]["recipe_hash"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    return run


def test_mlflow_default_store_no_variables(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    """No MLFLOW_* variable: MLflow 3's default sqlite:///mlflow.db in the working directory."""
    pytest.importorskip("sqlalchemy")
    _clean_mlflow_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["mlflow"])
    assert (tmp_path / "mlflow.db").is_file()
    _read_back(f"sqlite:///{tmp_path / 'mlflow.db'}", res)


def test_mlflow_file_store_without_the_switch(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=file:... alone (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true too)."""
    _clean_mlflow_env(monkeypatch)
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["mlflow"])
    _read_back(uri, res)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the server takes ~8-20 s to start on a shared 2-core machine
def test_mlflow_local_server(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("flask")
    _clean_mlflow_env(monkeypatch)
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")]
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["mlflow"])
        run = _read_back(url, res)
        from mlflow import MlflowClient

        assert "result.json" in [a.path for a in MlflowClient(url).list_artifacts(run.info.run_id)]
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp_path / "art", ignore_errors=True)


def test_tracker_that_cannot_start_is_one_line_before_training(tiny_models, sentiment_dir, tmp_path, monkeypatch,
                                                               capsys):
    """A server that is not there: one line, exit 2, before any run directory exists."""
    import yaml

    from peftkit import cli

    _clean_mlflow_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    d = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora")
    d["output"] = {"report_to": ["mlflow"]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a real `peftkit` process does this (cli._quiet)
    capsys.readouterr()
    try:
        rc = cli.main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")])
    finally:
        transformers.utils.logging.enable_progress_bar()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: output.report_to: mlflow cannot use http://"), err
    assert not (tmp_path / "run").exists()


def test_wandb_online_without_login_is_one_line(tiny_models, sentiment_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from peftkit.training.tracking import TrackerError

    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no stored login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    d = tiny_recipe(tiny_models["bert"], sentiment_dir)
    d["output"] = {"report_to": ["wandb"]}
    with pytest.raises(TrackerError, match="wandb is online but cannot start .*WANDB_MODE=offline"):
        Tracking(R.from_dict(d), tmp_path / "run")


def test_tracker_failing_mid_run_never_loses_the_run(tiny_models, sentiment_dir, tmp_path, mlflow_store,
                                                     monkeypatch, capsys):
    """The tracker dies after the first record: one warning, training goes on, log.jsonl complete."""
    import accelerate

    calls = []

    def broken(self, values, step=None, log_kwargs=None):
        calls.append(step)
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(accelerate.Accelerator, "log", broken)
    res = _train(tiny_models, sentiment_dir, tmp_path / "run", ["mlflow"])
    err = capsys.readouterr().err
    assert err.count("failed mid-run") == 1 and "ConnectionError: tracking server went away" in err
    assert len(calls) == 1
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["run"]["recipe_hash"] == res["run"]["recipe_hash"]


def test_compare_group_checks_trackers_before_any_run(tmp_path, monkeypatch):
    from peftkit.training.tracking import TrackerError

    _clean_mlflow_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    ran = []
    with pytest.raises(TrackerError, match="output.report_to: mlflow cannot use http://127.0.0.1"):
        with compare_group("g", {"mlflow"}):
            ran.append(1)
    assert ran == []
