"""Fault injection: SIGKILL a tiny training run at random steps, resume, compare bitwise.

    python benchmarks/fault_injection.py --kills 20 [--seed 0] [--steps 36]

Trains a tiny random BERT with LoRA (dropout on) on synthetic data in fp32 on the CPU: once
uninterrupted (the reference), then again in a fresh run directory, killed with SIGKILL each
time the log passes a random step (plus a random delay, so some kills land inside checkpoint
writes), and resumed by running the same command again. Prints whether the final
strategy.safetensors and metrics are identical to the reference, and whether any file in the
run directory was lost or corrupt (every checkpoint checked against its manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "peftkit", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def last_step(log: Path) -> int:
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
    return 0


def kill_at(recipe: Path, out: Path, step: int, delay: float, timeout: float = 600) -> bool:
    """Start a run, SIGKILL it once the log passes ``step`` (+delay); False if it finished first."""
    p = subprocess.Popen(cli("train", str(recipe), "--out", str(out)), env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and last_step(out / "log.jsonl") < step:
        if time.time() - t0 > timeout:
            break
        time.sleep(0.01)
    time.sleep(delay)
    if p.poll() is not None:
        err = p.stderr.read()
        if p.returncode != 0:
            raise RuntimeError(f"run failed before the kill (rc {p.returncode}): {err}")
        return False
    p.kill()
    p.wait()
    return True


def finish(recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cli("train", str(recipe), "--out", str(out)), env=env(), capture_output=True, text=True)


def same_result(a: Path, b: Path) -> list[str]:
    """Differences between two finished runs: weights bitwise, metrics exactly."""
    diffs = []
    if (a / "strategy.safetensors").read_bytes() != (b / "strategy.safetensors").read_bytes():
        diffs.append("strategy.safetensors differs")
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    ea = {k: v for k, v in ra["metrics"]["eval"].items() if not k.startswith("eval_")}
    eb = {k: v for k, v in rb["metrics"]["eval"].items() if not k.startswith("eval_")}
    if ea != eb:
        diffs.append(f"eval metrics differ: {ea} vs {eb}")
    if ra["metrics"]["train_loss"] != rb["metrics"]["train_loss"]:
        diffs.append(f"train_loss differs: {ra['metrics']['train_loss']} vs {rb['metrics']['train_loss']}")
    return diffs


def damaged_files(run: Path) -> list[str]:
    """Checkpoints failing their manifest, temp files left behind, missing outputs."""
    from peftkit.training import checkpoint

    bad = [f"{p}: {why}" for p in checkpoint.step_dirs(run / "checkpoints") if (why := checkpoint.verify(p))]
    bad += [str(p) for p in run.rglob("*") if p.name.startswith((".tmp", ".old"))]
    bad += [f"{run / n} missing" for n in ("result.json", "strategy.safetensors", "log.jsonl")
            if not (run / n).exists()]
    try:
        json.loads((run / "result.json").read_text())
        for line in (run / "log.jsonl").read_text().splitlines():
            json.loads(line)
    except (OSError, ValueError) as e:
        bad.append(f"unreadable output: {e}")
    return bad


def make_recipe(work: Path, steps: int, every: int) -> Path:
    from conftest import build_tiny, sentiment_rows, tiny_recipe, write_csv

    model = build_tiny("bert", work / "bert")
    data = work / "data"
    data.mkdir()
    for split, (n, seed) in {"train": (96, 0), "validation": (32, 1), "test": (32, 2)}.items():
        write_csv(data / f"{split}.csv", sentiment_rows(n, seed))
    r = tiny_recipe(model, data, "lora", max_steps=steps, checkpoint_every=every, log_every=1, eval_every=10)
    r["strategy"]["dropout"] = 0.1  # dropout RNG must be restored for an exact resume
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--runs", type=int, default=0, help="resumed runs (default: kills // 2)")
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    runs = a.runs or max(1, a.kills // 2)
    with tempfile.TemporaryDirectory(prefix="peftkit-faults-") as tmp:
        work = Path(tmp)
        recipe = make_recipe(work, a.steps, a.every)
        ref = work / "reference"
        p = finish(recipe, ref)
        if p.returncode:
            print(p.stderr, file=sys.stderr)
            return 1
        per_run = [a.kills // runs + (i < a.kills % runs) for i in range(runs)]
        identical, damaged, kills_done = 0, [], 0
        t0 = time.time()
        for i, n in enumerate(per_run):
            out = work / f"run{i}"
            points = sorted(rng.randint(1, a.steps) for _ in range(n))
            for k in points:
                kills_done += kill_at(recipe, out, k, rng.uniform(0, 0.3))
            p = finish(recipe, out)
            if p.returncode:
                damaged.append(f"{out}: final resume failed (rc {p.returncode}): {p.stderr.strip()[-300:]}")
                continue
            diffs = same_result(ref, out)
            identical += not diffs
            damaged += [f"{out}: {d}" for d in diffs] + damaged_files(out)
            print(f"run {i}: killed at steps {points}: {'identical' if not diffs else '; '.join(diffs)}", flush=True)
        lost = [d for d in damaged if "differs" not in d]
        print(f"{identical}/{runs} resumed runs identical to the reference ({kills_done} SIGKILLs at random steps), "
              f"{len(lost)} lost or corrupted files ({time.time() - t0:.0f} s)")
        for d in damaged:
            print("  " + d)
        return 0 if identical == runs and not damaged else 1


if __name__ == "__main__":
    sys.exit(main())
