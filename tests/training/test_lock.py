"""One writer per run directory (fcntl.flock held for the run's life); compare's children die
with their parent."""

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
from peftkit.training import lock as L


def _holder(run_dir):
    """Another process holding ``run_dir``'s lock until killed; returns it once the lock is held."""
    code = ("import sys, time; from peftkit.training import lock; lock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_refused_naming_the_holder_then_free_after_kill(tmp_path):
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(L.Busy, match=rf"^{run}: another peftkit process \(pid {p.pid}\) is writing"):
            L.acquire(run)
    finally:
        p.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock
        p.wait(timeout=30)
    with L.held(run):
        assert (run / L.LOCK).read_text().strip() == str(os.getpid())
    assert list(run.iterdir()) == []  # released: no lock file left (the directory was the holder's)


def test_train_refuses_in_one_line_while_another_writes(tmp_path, tiny_models, sentiment_dir, capsys):
    from peftkit import cli

    out = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_models["bert"], sentiment_dir)))
    p = _holder(out)
    try:
        capsys.readouterr()
        rc = cli.main(["train", str(tmp_path / "r.yaml"), "--out", str(out), "--force"])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    finally:
        p.kill()
        p.wait(timeout=30)
    assert rc == 2 and len(err) == 1 and f"(pid {p.pid}) is writing this run directory" in err[0], err
    assert sorted(x.name for x in out.iterdir()) == [L.LOCK]  # --force deleted nothing of the holder's


def test_reentrant_in_one_process_and_released_by_fit(tmp_path, tiny_models, sentiment_dir):
    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    a = L.acquire(tmp_path / "x")
    b = L.acquire(tmp_path / "x")
    assert a is b and a.count == 2
    a.release()
    assert (tmp_path / "x" / L.LOCK).exists()
    b.release()
    assert not (tmp_path / "x").exists()
    t = Trainer(build(R.from_dict(tiny_recipe(tiny_models["bert"], sentiment_dir, max_steps=1))), tmp_path / "run")
    t.fit()
    assert t.lock is None and not (tmp_path / "run" / L.LOCK).exists()
    assert (tmp_path / "run" / "result.json").is_file()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_dies_with_its_parent(tmp_path):
    """The preexec that executors use: the child gets SIGTERM when its parent is SIGKILLed."""
    code = f"""
import subprocess, sys, time
sys.path.insert(0, {str(ROOT)!r})
from peftkit.io import die_with_parent
c = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=die_with_parent())
print(c.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child) and os.getpgid(child) == child  # its own process group
    parent.kill()
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


def _last_step(log):
    try:
        return max([json.loads(x).get("step", 0) for x in log.read_text().splitlines() if x.strip().endswith("}")]
                   or [0])
    except OSError:
        return 0


@pytest.mark.slow  # two compare processes on tiny runs (~40 s)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_compare_killed_its_trainer_stops_and_a_rerun_continues(tiny_models, sentiment_dir, tmp_path):
    base = tiny_recipe(tiny_models["bert"], sentiment_dir, "lora", max_steps=40, checkpoint_every=2, log_every=1)
    f = tmp_path / "compare.yaml"
    f.write_text(yaml.safe_dump({"base": base, "variants": [{"name": "a", "set": {}}]}))
    out = tmp_path / "out"
    run = out / "a" / "seed0"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "peftkit", "compare", str(f), "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _last_step(run / "log.jsonl") < 3:
        assert p.poll() is None and time.monotonic() < deadline, "compare ended before the kill"
        time.sleep(0.05)
    trainer = int((run / L.LOCK).read_text())  # the trainer process holding the run dir
    p.kill()  # the compare process only (SIGKILL): its trainer must not train on, orphaned
    p.wait(timeout=30)
    deadline = time.monotonic() + 60
    while _alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(trainer)
    assert not (run / "result.json").exists() and _last_step(run / "log.jsonl") < 40
    p = run_cli("compare", str(f), "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((run / "result.json").read_text())
    assert res["speed"]["resumed_from_step"] >= 2 and res["speed"]["steps"] == 40
