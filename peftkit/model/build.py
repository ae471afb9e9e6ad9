"""Recipe -> (task, backbone, strategy): the one place that wires the parts together."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from peftkit.model import backbone
from peftkit import hardware, strategies, tasks
from peftkit.recipe import Recipe


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
    tokenizer, task = _task(recipe)
    loaded = backbone.load(hardware.pinned(recipe).model, task, tokenizer)  # compute_dtype auto resolved
    strategy = strategies.get(recipe.strategy)
    head = task.head(loaded.model)
    model = strategy.apply(loaded.model, head) if apply_strategy else loaded.model
    return Built(recipe, task, strategy, model, tokenizer, head, loaded.info, time.perf_counter() - t0)


# While ``shared_data()`` is on (peftkit.runs.trial_batch: several search trials in one process), builds
# of the same task and tokenizer share one Task, so its splits are read and tokenized once.
_SHARED: dict | None = None


@contextmanager
def shared_data():
    global _SHARED
    _SHARED = {}
    try:
        yield
    finally:
        _SHARED = None


def _task(recipe: Recipe):
    m = recipe.model
    key = (m.name, m.revision, m.trust_remote_code, recipe.task.model_dump_json())
    if _SHARED is not None and key in _SHARED:
        return _SHARED[key]
    tokenizer = backbone.load_tokenizer(m)
    task = tasks.get(recipe.task, tokenizer)
    if _SHARED is not None:
        task.keep_encoded = True
        _SHARED[key] = tokenizer, task
    return tokenizer, task
