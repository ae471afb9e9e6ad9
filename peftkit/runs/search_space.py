"""The search space of a compare recipe's ``search:`` section and the halving arithmetic.

Schema only (no runs): ``compare`` validates recipes with it, ``search`` runs them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

from pydantic import Field, model_validator

from peftkit.config import Section
from peftkit.errors import RecipeError

LOWER_IS_BETTER = ("loss", "perplexity")


class LogGrid(Section):
    low: float = Field(gt=0)
    high: float = Field(gt=0)
    points: int = Field(ge=1, le=64)

    @model_validator(mode="after")
    def _order(self):
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self

    def values(self) -> list[float]:
        if self.points == 1:
            return [self.low]
        r = math.log(self.high / self.low)
        return [float(f"{self.low * math.exp(r * i / (self.points - 1)):.3g}") for i in range(self.points)]


class Space(Section):
    lr: list[float] | LogGrid | None = None  # None: the variant's strategy's default_lr
    grid: dict[str, list[Any]] = {}  # other dotted recipe keys -> values, crossed with lr

    @model_validator(mode="after")
    def _not_empty(self):
        # An empty list would search nothing (lr: [] fell back to the default grid silently).
        empty = (["lr"] if self.lr == [] else []) + [f"grid.{k}" for k, v in self.grid.items() if not v]
        if empty:
            raise ValueError(f"{', '.join(empty)}: an empty list searches nothing; give at least one value")
        return self


class SearchConfig(Space):
    eta: int = Field(2, ge=2)
    # What a rung ranks by. "loss": the validation loss where the task reports one (classification:
    # cross-entropy), else the primary metric; "primary": the task's primary metric (accuracy...),
    # ties broken by the loss. Accuracy is a step function of the logits: after 15 of 60 quickstart
    # steps 27 of 32 trials predicted one class for (nearly) all 400 validation snippets, and the
    # majority-class ones won at 0.5725 -- among them diverged rates (IA3 at lr 0.1, loss 11.3,
    # then 0.36 on test). The loss is a proper score: it ranks how far each trial got, and a
    # diverged one last (HF Trainer's metric_for_best_model defaults to it for the same reason).
    metric: Literal["loss", "primary"] = "loss"
    # Grid-edge extension: when a variant's best lr after the first rung is its grid's lowest (or
    # highest), one more point a grid step beyond it (the ratio of the two nearest rates) trains to
    # the first rung's fraction and joins the ranking; up to ``extend`` times per variant, each at
    # the cost of that fraction (eta 2, 3 points: +0.25 budgets). On validation only, like the rest.
    # Off by default: a shipped default grid's cost stays what search_space.cost() says.
    extend: int = Field(0, ge=0, le=8)
    variants: dict[str, Space] = {}


def beyond_edge(lrs: list[float], lr: float) -> float | None:
    """The next rate past the grid's edge that ``lr`` sits on (None: ``lr`` is inside the grid)."""
    lrs = sorted(set(lrs))
    if len(lrs) < 2 or lr not in (lrs[0], lrs[-1]):
        return None
    a, b = (lrs[0], lrs[1]) if lr == lrs[0] else (lrs[-1], lrs[-2])
    return float(f"{a * a / b:.3g}")


def _short(x: float) -> str:
    """1.5e-04, 2e-05: every significant digit (``:.0e`` printed 1.5e-4 as 2e-04), fixed-width exponent."""
    mant, exp = f"{x:.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{exp}"


def point_label(point: dict) -> str:
    """Directory name of a grid point: lr1e-04_strategy.r16 (safe characters only)."""
    parts = []
    for k, v in point.items():
        key = "lr" if k == "train.lr" else k
        val = _short(v) if isinstance(v, float) else str(v)
        parts.append(f"{key}{val}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


def points(space: Space, strategy: str) -> list[dict]:
    if isinstance(space.lr, LogGrid):
        lrs = space.lr.values()
    elif space.lr:
        lrs = list(space.lr)
    else:
        lrs = list(default_lr(strategy))
    keys = ["train.lr", *space.grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(lrs, *space.grid.values())]


def default_lr(strategy: str) -> tuple[float, ...]:
    """A strategy's own default grid (``Strategy.default_lr``; every registered strategy has one)."""
    from peftkit import strategies

    cls = strategies.REGISTRY.get(strategy)
    if cls is None:
        raise RecipeError(f"search: no default lr grid for strategy '{strategy}'; give search.lr")
    return cls.default_lr


def rungs(n: int, eta: int) -> list[tuple[int, float]]:
    """(trials, budget fraction) per rung before the full budget; [] when n == 1."""
    counts = [n]
    while counts[-1] > 1:
        counts.append(math.ceil(counts[-1] / eta))
    k = len(counts) - 1
    return [(counts[i], eta ** (i - k)) for i in range(k)]


def cost(n: int, eta: int) -> float:
    """Budgets trained by one search (continuations from checkpoints), in units of one run."""
    done, total = 0.0, 0.0
    for count, frac in rungs(n, eta):
        total += count * (frac - done)
        done = frac
    return total + (1 - done)
