"""Recipe -> (task, backbone, strategy): the one place that wires the parts together."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import backbone, hardware, strategies, tasks
from .recipe import Recipe


@dataclass
class Built:
    recipe: Recipe
    task: tasks.Task
    strategy: strategies.Strategy
    model: torch.nn.Module
    tokenizer: object
    head: list[str]
    backbone_info: dict
    load_s: float


def build(recipe: Recipe, apply_strategy: bool = True) -> Built:
    t0 = time.perf_counter()
    # New heads and adapters are initialised from the recipe's seed: same start on every rank and run.
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    tokenizer = backbone.load_tokenizer(recipe.model)
    task = tasks.get(recipe.task, tokenizer)
    loaded = backbone.load(hardware.pinned(recipe).model, task, tokenizer)  # compute_dtype auto resolved
    strategy = strategies.get(recipe.strategy)
    head = task.head(loaded.model)
    model = strategy.apply(loaded.model, head) if apply_strategy else loaded.model
    return Built(recipe, task, strategy, model, tokenizer, head, loaded.info, time.perf_counter() - t0)
