"""Several search trials trained one after another in one process: ``python -m peftkit.runs.trial_batch FILE``.

Why: a quickstart trial trains 15 steps (~4 s), but a fresh process spends ~13 s before its
first step (imports, reading and tokenizing the data, loading the weights). Every trial of a
rung trains on the same task (compare checks it), so one process per batch of trials imports
once, tokenizes once (``build``'s ``shared`` cache) and loads the weights from memory-mapped files
already read. Each trial is still ``peftkit train`` of its own run directory (``train_here``: the
same run-dir checks, seeding from the recipe, files and exit codes as a fresh process), so it gives
the same numbers as alone (``tests/runs/test_search_batch.py`` checks it after other strategies).
What a shared process cannot measure is memory: a rung's result only yields its validation
score (it skips the estimate); the final run of the selected setting trains in a process of its
own (``peftkit.runs.search``).

A trial that fails gets its ``error.json`` and the batch goes on; if the whole process dies, the
search trains the trials it left without a record again, each in a process of its own.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from peftkit.errors import UserError
from peftkit.runs.spec import RunSpec
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


def quiet_libraries() -> None:
    """What ``peftkit train`` silences (library deprecations and notices), kept out of every trial's log."""
    warnings.filterwarnings("ignore")
    for name in ("bitsandbytes", "transformers", "accelerate", "datasets", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def read_manifest(path: Path) -> list[RunSpec]:
    """The batch's trials as written by ``TrialBatch.command``: each from its recipe file."""
    from peftkit import recipe as R

    specs = []
    for t in json.loads(Path(path).read_text())["trials"]:
        spec = RunSpec(t["variant"], t["seed"], R.load(t["recipe"]), Path(t["out"]))
        if spec.hash != t["hash"]:  # the file changed under us: train nothing rather than the wrong recipe
            raise RuntimeError(f"{t['recipe']}: recipe hash {spec.hash} != {t['hash']} planned by the search")
        specs.append(spec)
    return specs


def train_here(spec: RunSpec, shared: dict | None = None) -> int:
    """``peftkit train --force`` of one run in this process (what ``api.train`` does: the run-dir rules,
    build, fit); exit code and one-line errors as that command's."""
    from peftkit.model.build import build
    from peftkit.training.rundir import check_run_dir
    from peftkit.training.trainer import Trainer

    try:
        mode = check_run_dir(spec.dir, spec.hash, force=True)
        res = Trainer(build(spec.recipe, shared=shared), spec.dir, resume=mode == "resume").fit()
    except UserError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - one trial's crash is recorded; the batch goes on
        traceback.print_exc()
        return 1
    shown = ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"]["eval"].items() if isinstance(v, float))
    print(f"[peftkit] done: {shown} on {res['metrics']['eval_split']}; result: {spec.dir / 'result.json'}")
    return 0


def train_one(spec: RunSpec, shared: dict | None = None) -> int:
    """One trial, its log in its run dir; a failure gets its error.json (as a process of its own would)."""
    from peftkit.runs.executors import error_record

    spec.dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "error.json"):
        (spec.dir / stale).unlink(missing_ok=True)
    log, t0 = spec.dir / "train.log", time.perf_counter()
    with _output_to(log):
        rc = train_here(spec, shared)
    gc.collect()  # the trial's model and optimizer before the next one's
    if rc == 0 and (spec.dir / "result.json").exists():
        return 0
    error_record(spec, rc, round(time.perf_counter() - t0, 1), spec.argv(), log)
    return rc or 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_libraries()
    trials = read_manifest(Path(argv[0]))
    failed = 0
    shared: dict = {}  # the trials' tokenizer and tokenized splits, built once (model.build's cache)
    for i, spec in enumerate(trials):
        t0 = time.perf_counter()
        rc = train_one(spec, shared)
        what = "done" if rc == 0 else f"FAILED (exit {rc}; {spec.dir / 'error.json'})"
        print(f"[trial {i + 1}/{len(trials)}] {spec.dir}: {what} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc == 130:  # interrupted: the search resumes the rest
            return 130
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
