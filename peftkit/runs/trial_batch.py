"""Several search trials trained one after another in one process: ``python -m peftkit.runs.trial_batch FILE``.

Why: a quickstart trial trains 15 steps (~4 s), but a fresh process spends ~13 s before its
first step (imports, reading and tokenizing the data, loading the weights). Every trial of a
rung trains on the same task (compare checks it), so one process per batch of trials imports
once, tokenizes once (``build.shared_data``) and loads the weights from memory-mapped files
already read. Each trial is still ``peftkit train`` of its own run directory (``cli.main``: the
same checks, seeding from the recipe, files and exit codes as a fresh process), so it gives the
same numbers as alone (``tests/test_search.py`` checks it after other strategies in the batch).
What a shared process cannot measure is memory: a rung's result only yields its validation
score (it skips the estimate); the final run of the selected setting trains in a process of its
own (``peftkit.runs.search``).

A trial that fails gets its ``error.json`` and the batch goes on; if the whole process dies, the
search trains the trials it left without a record again, each in a process of its own.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from peftkit.runs.trials import TrialBatch, groups  # noqa: F401  (the batch this process runs is described there)


@contextmanager
def _output_to(path: Path):
    """stdout and stderr (file descriptors too: C libraries write there) into ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", encoding="utf-8", buffering=1) as f, redirect_stdout(f), redirect_stderr(f):
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            f.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class _Trial:  # error_record's view of one manifest entry
    def __init__(self, t: dict):
        self.variant, self.seed, self.hash, self.dir = t["variant"], t["seed"], t["hash"], Path(t["out"])


def train_one(t: dict) -> int:
    """``peftkit train`` of one manifest entry in this process; its log goes to its run dir."""
    from peftkit import cli
    from peftkit.runs.executors import error_record

    run = _Trial(t)
    run.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "error.json"):
        (run.dir / stale).unlink(missing_ok=True)
    argv = ["train", t["recipe"], "--out", t["out"], "--force"]
    log, t0 = run.dir / "train.log", time.perf_counter()
    with _output_to(log):
        try:
            rc = cli.main(argv)
        except Exception:  # noqa: BLE001 - one trial's crash is recorded; the batch goes on
            traceback.print_exc()
            rc = 1
    gc.collect()  # the trial's model and optimizer before the next one's
    if rc == 0 and (run.dir / "result.json").exists():
        return 0
    error_record(run, rc, round(time.perf_counter() - t0, 1), [sys.executable, "-m", "peftkit", *argv], log)
    return rc or 1


def main(argv: list[str] | None = None) -> int:
    from peftkit.model import build

    argv = sys.argv[1:] if argv is None else argv
    trials = json.loads(Path(argv[0]).read_text())["trials"]
    failed = 0
    with build.shared_data():
        for i, t in enumerate(trials):
            t0 = time.perf_counter()
            rc = train_one(t)
            what = "done" if rc == 0 else f"FAILED (exit {rc}; {Path(t['out']) / 'error.json'})"
            print(f"[trial {i + 1}/{len(trials)}] {t['out']}: {what} in {time.perf_counter() - t0:.1f} s", flush=True)
            if rc == 130:  # interrupted: the search resumes the rest
                return 130
            failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
