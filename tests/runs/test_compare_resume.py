"""A killed ``peftkit compare`` rerun finishes only what is missing, resuming the killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, run_cli, tiny_recipe

pytest.importorskip("peftkit.runs.compare")


def last_step(log):
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return 0
    return max([json.loads(x).get("step", 0) for x in lines if x.strip().endswith("}")] or [0])


@pytest.mark.slow  # 47 s; a rerun submitting only what is missing is also covered by test_executors
def test_killed_compare_rerun_resumes(tiny_models, sentiment_dir, tmp_path):
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=12, checkpoint_every=2, log_every=1)
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": base, "variants": [
        {"name": "a", "set": {"strategy.r": 8}}, {"name": "b", "set": {"strategy.r": 4}}]}))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "peftkit", "compare", str(f), "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    b_log = out / "b" / "seed0" / "log.jsonl"
    while last_step(b_log) < 5:
        assert p.poll() is None, "compare finished before the kill"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # compare (its training process has a group of its own)
    p.wait()
    # The orphaned trainer got SIGTERM from the kernel (PR_SET_PDEATHSIG): it checkpoints and
    # exits, releasing the run dir's lock; the rerun starts once it has.
    from peftkit.training import lock

    deadline = time.monotonic() + 120
    while True:
        try:
            with lock.held(out / "b" / "seed0"):
                break
        except lock.Busy:
            assert time.monotonic() < deadline, "the orphaned trainer kept running"
            time.sleep(0.1)
    a_res = out / "a" / "seed0" / "result.json"
    mtime = a_res.stat().st_mtime_ns
    assert not (out / "b" / "seed0" / "result.json").exists()
    assert (out / "b" / "seed0" / "checkpoints").is_dir()

    p = run_cli("compare", str(f), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("up to date, skipped") == 1  # a is not trained again
    assert a_res.stat().st_mtime_ns == mtime
    res = json.loads((out / "b" / "seed0" / "result.json").read_text())
    assert res["speed"]["resumed_from_step"] >= 4 and res["speed"]["steps"] == 12  # b resumed, not restarted
