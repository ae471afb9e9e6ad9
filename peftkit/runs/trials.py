"""A search rung's trials as executor runs: several trial runs in ONE process (``peftkit.runs.trial_batch``).

Kept apart from the entry point: the search plans batches here, and the process that runs them
(``trial_batch.main``) calls the CLI, which calls the search; this module imports neither.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from peftkit.io import atomic_write_json


class TrialBatch:
    """What an executor runs (peftkit.runs.executors.Run): one process for several trial runs."""

    def __init__(self, runs: list, folder: Path, title: str):
        self.runs, self.dir = runs, Path(folder)
        self.variant = title  # the executor's label: "[i/n] <title> seed <s>"
        self.seed = runs[0].seed
        self.recipe = runs[0].recipe
        self.hash = hashlib.sha256(" ".join(r.hash for r in runs).encode()).hexdigest()[:16]
        self.runs_in_process = len(runs)  # the executor's per-run timeout covers each of them

    def done(self) -> bool:
        return all(r.done() for r in self.runs)

    def command(self) -> list[str]:
        """Write each trial's recipe next to its run dir (as a single run would) and the manifest."""
        from peftkit.runs.executors import train_command

        trials = []
        for r in self.runs:
            cmd = train_command(r)  # [python, -m, peftkit, train, RECIPE, --out, DIR, --force]
            trials.append({"recipe": cmd[4], "out": cmd[6], "variant": r.variant, "seed": r.seed, "hash": r.hash})
        manifest = self.dir / "trials.json"
        atomic_write_json(manifest, {"trials": trials})
        return [sys.executable, "-m", "peftkit.runs.trial_batch", str(manifest)]


def groups(runs: list, n: int) -> list[list]:
    """``runs`` cut into at most ``n`` contiguous groups of near-equal size (order kept)."""
    n = max(1, min(n, len(runs)))
    size, extra = divmod(len(runs), n)
    out, k = [], 0
    for i in range(n):
        m = size + (i < extra)
        out.append(runs[k:k + m])
        k += m
    return [g for g in out if g]
