"""Executors behind compare: local pool (--parallel), SLURM through submitit's local executor, Ray."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_recipe
from peftkit.runs import compare as C
from peftkit.runs import executors as X
from peftkit.errors import UserError


def _compare(tmp_path, tiny_models, sentiment_dir, variants, base_train=None, **extra) -> Path:
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", **(base_train or {"max_steps": 3}))
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": base, "seeds": [0], "variants": variants, **extra}))
    return f


def _results(out: Path) -> dict:
    return {p.parent.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/seed0/result.json"))}


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not k.endswith("_s")}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def _comparable(res: dict) -> dict:
    # What a comparison reports from a run: its metrics (eval, train loss, history), less clock times.
    return {v: _untimed(r["metrics"]) for v, r in res.items()}


VARIANTS = [{"name": "full", "set": {"strategy.name": "full", "train.lr": 1.0e-4}},
            {"name": "lora", "set": {"strategy.name": "lora", "strategy.r": 4}}]


@pytest.fixture(scope="module")
def serial(tiny_models, sentiment_dir, tmp_path_factory):
    """The comparison run one after another (the reference for the parallel executors)."""
    tmp = tmp_path_factory.mktemp("serial")
    f = _compare(tmp, tiny_models, sentiment_dir, VARIANTS)
    assert C.compare(f, tmp / "out", echo=lambda _: None) == 0
    return f, _results(tmp / "out")


def test_options_reject_bad_input(tmp_path):
    with pytest.raises(UserError, match="executor.parallel"):
        X.from_options("local", parallel=0)
    with pytest.raises(UserError, match="executor.partitionn: unknown option"):
        X.from_options("slurm", partitionn="gpu")
    with pytest.raises(UserError, match=r"2 runs x 1 GPU\(s\) each, but 0 GPU\(s\)"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            X.from_options("local", parallel=2, gpus_per_run=1)
        finally:
            del os.environ["CUDA_VISIBLE_DEVICES"]
    local = X.from_options("local", parallel=2, cpus_per_run=1)
    assert [s["OMP_NUM_THREADS"] for s in local.slots] == ["1", "1"]


def test_local_parallel_matches_serial(serial, tmp_path):
    f, ref = serial
    lines: list[str] = []
    assert C.compare(f, tmp_path / "par", echo=lines.append, executor={"name": "local", "parallel": 2}) == 0
    par = _results(tmp_path / "par")
    assert set(ref) == set(par) == {"full", "lora"}
    # Exactly: same recipe, same data order, fp32 (only the thread count per process differs).
    assert _comparable(ref) == _comparable(par)
    meta = json.loads((tmp_path / "par" / "compare.json").read_text())
    assert meta["executor"]["parallel"] == 2
    assert {r["execution"]["status"] for r in meta["runs"]} == {"done"}
    assert all("slot" in r["execution"]["where"] and r["execution"]["seconds"] > 0 for r in meta["runs"])
    table = [x for x in lines if x.startswith("run ") and "where" in x]
    assert len(table) == 1 and "[2/2] lora seed 0  done" in table[0] and "accuracy" in table[0]
    # Re-run: nothing is submitted again, and compare.json keeps where each run ran.
    lines.clear()
    assert C.compare(f, tmp_path / "par", echo=lines.append, executor={"parallel": 2}) == 0
    assert sum("up to date, skipped" in x for x in lines) == 2 and not any("fresh process" in x for x in lines)
    again = json.loads((tmp_path / "par" / "compare.json").read_text())
    assert [r["execution"] for r in again["runs"]] == [r["execution"] for r in meta["runs"]]


def _training_pid(run_dir: Path) -> int | None:
    """The `peftkit train` process writing ``run_dir`` (to find its submitit worker, the parent)."""
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and str(run_dir).encode() in cmd:
            return int(d.name)
    return None


def _ppid(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _last_step(log: Path) -> int:
    try:
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip().endswith("}")]
    except OSError:
        return 0
    return max([r.get("step", 0) for r in rows] or [0])


def test_slurm_through_submitit_local_preempted_and_requeued(tiny_models, sentiment_dir, tmp_path):
    pytest.importorskip("submitit")
    import signal

    f = _compare(tmp_path, tiny_models, sentiment_dir, [{"name": "lora", "set": {"strategy.r": 4}}],
                 base_train={"max_steps": 16, "checkpoint_every": 2, "log_every": 1},
                 executor={"name": "slurm", "cluster": "local", "time_min": 10})
    out = tmp_path / "out"
    run_dir = out / "lora" / "seed0"
    lines: list[str] = []
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(C.compare(f, out, echo=lines.append)))
    t.start()
    deadline = time.monotonic() + 240
    while _last_step(run_dir / "log.jsonl") < 3:  # checkpoints at steps 2, 4, ... are on disk
        assert t.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.02)
    pid = _training_pid(run_dir)
    assert pid is not None
    os.kill(_ppid(pid), signal.SIGUSR2)  # what SLURM sends before preempting: the worker checkpoints + requeues
    t.join(timeout=400)
    assert rc == [0], lines
    res = json.loads((run_dir / "result.json").read_text())
    assert 2 <= res["speed"]["resumed_from_step"] < 16 and res["speed"]["steps"] == 16  # resumed, not restarted
    row = json.loads((out / "compare.json").read_text())["runs"][0]
    assert row["execution"]["status"] == "done" and row["execution"]["where"].startswith("slurm:")
    assert any("submitted as job" in x for x in lines)
    logs = list((out / "_slurm").glob("*/*_log.out"))
    assert logs  # submitit's own log per job
    # Re-run after the fact: nothing missing, nothing submitted.
    lines.clear()
    assert C.compare(f, out, echo=lines.append) == 0
    assert any("up to date, skipped" in x for x in lines) and not any("submitted" in x for x in lines)


def test_ray_local_instance(serial, tmp_path):
    ray = pytest.importorskip("ray")
    f, ref = serial
    # Workers import this checkout's peftkit (not an installed one).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        lines: list[str] = []
        assert C.compare(f, tmp_path / "ray", echo=lines.append, executor={"name": "ray", "parallel": 2}) == 0
    finally:
        ray.shutdown()
    assert _comparable(_results(tmp_path / "ray")) == _comparable(ref)
    rows = json.loads((tmp_path / "ray" / "compare.json").read_text())["runs"]
    assert all(r["execution"]["where"].startswith("ray:") for r in rows)
