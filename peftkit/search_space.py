"""The search space of a compare recipe's ``search:`` section and the halving arithmetic.

Schema only (no runs): ``compare`` validates recipes with it, ``search`` runs them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from pydantic import Field, model_validator

from .config import Section
from .errors import RecipeError

# Default lr grids, 4 points spaced ~3x around values known to work (each ~centred on the
# rate of recipes/quickstart/<strategy>.yaml):
# full/freeze: BERT fine-tuning grid 2e-5..5e-5 (Devlin et al. 2019), extended upward for short budgets;
# lora/qlora: RoBERTa-base GLUE 4e-4..5e-4 (Hu et al. 2021), ~10x full ("LoRA Without Regret", 2025);
# adapter: Houlsby et al. 2019 searched 3e-5..3e-3 (Pfeiffer adapters commonly 1e-4..1e-3);
# prefix: P-tuning v2 (Liu et al. 2022) 5e-3..1e-2 on classification;
# ia3: T-Few (Liu et al. 2022) 3e-3; peft's method comparison 1e-3..5e-3;
# bitfit: Ben Zaken et al. 2022 searched 1e-4..1e-3 (BERT-base), higher for small models.
DEFAULT_LR = {
    "full": [2e-5, 5e-5, 1e-4, 2e-4],
    "freeze": [3e-5, 1e-4, 3e-4, 1e-3],
    "lora": [1.5e-4, 5e-4, 1.5e-3, 5e-3],
    "qlora": [1.5e-4, 5e-4, 1.5e-3, 5e-3],
    "adapter": [3e-4, 1e-3, 3e-3, 1e-2],
    "prefix": [3e-3, 1e-2, 3e-2, 1e-1],
    "ia3": [3e-3, 1e-2, 3e-2, 1e-1],
    "bitfit": [1.5e-3, 5e-3, 1.5e-2, 5e-2],
}
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
    lr: list[float] | LogGrid | None = None  # None: DEFAULT_LR of the variant's strategy
    grid: dict[str, list[Any]] = {}  # other dotted recipe keys -> values, crossed with lr


class SearchConfig(Space):
    eta: int = Field(2, ge=2)
    variants: dict[str, Space] = {}


def _label(point: dict) -> str:
    """Directory name of a grid point: lr1e-04_strategy.r16 (safe characters only)."""
    parts = []
    for k, v in point.items():
        key = "lr" if k == "train.lr" else k
        val = f"{v:.0e}" if isinstance(v, float) else str(v)
        parts.append(f"{key}{val}")
    return "_".join(parts).replace("/", "-").replace(" ", "")


def points(space: Space, strategy: str) -> list[dict]:
    if isinstance(space.lr, LogGrid):
        lrs = space.lr.values()
    elif space.lr:
        lrs = list(space.lr)
    elif strategy in DEFAULT_LR:
        lrs = DEFAULT_LR[strategy]
    else:
        raise RecipeError(f"search: no default lr grid for strategy '{strategy}'; give search.lr")
    keys = ["train.lr", *space.grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(lrs, *space.grid.values())]


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
