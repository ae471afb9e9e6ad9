"""What an executor runs: a :class:`Job`, one process. Two kinds, both spelled out here:

* :class:`RunSpec`: one training run (a variant x seed of a comparison, a search trial, a
  search's final run): ``python -m peftkit train <recipe> --out <dir>`` in a fresh process.
* ``peftkit.runs.trials.TrialBatch``: several search trials trained one after another in one
  process (``python -m peftkit.runs.trial_batch``).

Executors (``peftkit.runs.executors``) only ever use the :class:`Job` interface: they never ask
which kind a job is.
"""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from peftkit.io import atomic_write_text

if TYPE_CHECKING:
    from peftkit.recipe import Recipe


class Job(ABC):
    """One process an executor starts.

    ``dir``: the job's directory; the executor writes the process's output to ``dir/train.log``
    and, when it fails, ``dir/error.json`` (fields: :meth:`identity` plus the exit state).
    """

    dir: Path

    @property
    @abstractmethod
    def title(self) -> str:
        """What the executor's progress lines call it, e.g. ``lora seed 0``."""

    @property
    def runs_in_process(self) -> int:
        """Training runs this one process trains one after another (a per-run timeout covers each)."""
        return 1

    @abstractmethod
    def done(self) -> bool:
        """Finished before: the executor skips it (never submits it)."""

    @abstractmethod
    def command(self, args: Sequence[str] = ()) -> list[str]:
        """The process's argv; writes the files that command reads first. ``args``: the executor's
        extra ``peftkit train`` options (``--launcher`` ...)."""

    @abstractmethod
    def identity(self) -> dict:
        """What the job was, for its error record."""


@dataclass(frozen=True)
class RunSpec(Job):
    """One training run: its recipe (validated, precision pinned) and the run directory it writes."""

    variant: str
    seed: int
    recipe: Recipe
    dir: Path
    requested_precision: str = "auto"  # train.precision before compare pinned it (for compare.json)
    hash: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "dir", Path(self.dir))
        object.__setattr__(self, "hash", self.recipe.hash())

    @property
    def title(self) -> str:
        return f"{self.variant} seed {self.seed}"

    def with_recipe(self, recipe: Recipe, dir: Path | None = None) -> RunSpec:
        """The same variant and seed with another recipe (its hash follows), optionally elsewhere."""
        return replace(self, recipe=recipe, dir=self.dir if dir is None else dir)

    @property
    def recipe_file(self) -> Path:
        """Where the run's recipe is written: next to its run directory (``<variant>/seed<k>.yaml``)."""
        return self.dir.parent / f"seed{self.seed}.yaml"

    def write_recipe(self) -> Path:
        from peftkit.recipe import dump_yaml

        atomic_write_text(self.recipe_file, dump_yaml(self.recipe))
        return self.recipe_file

    def argv(self, args: Sequence[str] = ()) -> list[str]:
        """``peftkit train`` of :attr:`recipe_file` into :attr:`dir` (nothing written)."""
        return [sys.executable, "-m", "peftkit", "train", str(self.recipe_file), "--out", str(self.dir), "--force",
                *args]

    def command(self, args: Sequence[str] = ()) -> list[str]:
        self.write_recipe()
        return self.argv(args)

    def identity(self) -> dict:
        return {"variant": self.variant, "seed": self.seed, "recipe_hash": self.hash}

    def unreadable_result(self) -> str | None:
        """Why a result.json that exists cannot be read (truncated or edited), else None; the plan
        says it once (``compare.prepare``), ``done()`` then counts the run as not done."""
        try:
            json.loads((self.dir / "result.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return f"{self.dir / 'result.json'}: unreadable ({e.__class__.__name__}: truncated or edited?)"
        return None

    def done(self) -> bool:
        try:
            res = json.loads((self.dir / "result.json").read_text())
        except (OSError, ValueError):
            return False
        if res.get("run", {}).get("recipe_hash") != self.hash:
            return False
        # train.stop_at is not hashed (a search rung continues the same run): done = trained that far.
        m, stop = res.get("metrics") or {}, self.recipe.train.stop_at
        if stop is None:
            return "stopped_at" not in m
        return m.get("stopped_at") == self.recipe.train.stop_step(m.get("total_steps") or 0)
