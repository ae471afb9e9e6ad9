"""A search rung's trials as one executor job: several trial runs in ONE process (``peftkit.runs.trial_batch``).

Kept apart from the entry point: the search plans batches here; the process that trains them
(``trial_batch.main``) imports the trainer, which the search itself never needs.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Sequence

from peftkit.io import atomic_write_json
from peftkit.runs.spec import Job, RunSpec

MANIFEST = "trials.json"


class TrialBatch(Job):
    """One process for several trial runs (a :class:`~peftkit.runs.spec.Job`, not a run itself)."""

    def __init__(self, runs: Sequence[RunSpec], folder: Path, title: str):
        self.runs, self.dir, self._title = tuple(runs), Path(folder), title
        self.hash = hashlib.sha256(" ".join(r.hash for r in self.runs).encode()).hexdigest()[:16]

    @property
    def title(self) -> str:
        return self._title

    @property
    def runs_in_process(self) -> int:
        return len(self.runs)

    def done(self) -> bool:
        return all(r.done() for r in self.runs)

    def identity(self) -> dict:
        return {"batch": self.title, "trials": [str(r.dir) for r in self.runs], "recipe_hash": self.hash}

    def write_manifest(self) -> Path:
        """Each trial's recipe next to its run dir (as a single run would have it) and the manifest
        listing them (``peftkit.runs.trial_batch.read_manifest``)."""
        trials = [{"recipe": str(r.write_recipe()), "out": str(r.dir), "variant": r.variant, "seed": r.seed,
                   "hash": r.hash} for r in self.runs]
        manifest = self.dir / MANIFEST
        atomic_write_json(manifest, {"trials": trials})
        return manifest

    def command(self, args: Sequence[str] = ()) -> list[str]:
        if args:  # the search batches only runs of one process each (no --launcher)
            raise ValueError(f"a trial batch trains in one process; it takes no train options ({' '.join(args)})")
        return [sys.executable, "-m", "peftkit.runs.trial_batch", str(self.write_manifest())]


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
