"""Recipe -> (task, backbone, strategy): the one place that wires the parts together."""

from __future__ import annotations

import time
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


def build(recipe: Recipe, apply_strategy: bool = True, shared: dict | None = None) -> Built:
    """The recipe's parts, the model loaded and the strategy applied. ``shared``: a cache the caller
    owns (``peftkit.runs.trial_batch``: several search trials in one process), so builds of the same
    task and tokenizer share one Task and its splits are read and tokenized once."""
    t0 = time.perf_counter()
    # New heads and adapters are initialised from the recipe's seed: same start on every rank and run.
    from accelerate.utils import set_seed

    set_seed(recipe.train.seed)
    tokenizer, task = _task(recipe, shared)
    loaded = backbone.load(hardware.pinned(recipe).model, task, tokenizer)  # compute_dtype auto resolved
    strategy = strategies.get(recipe.strategy)
    head = task.head(loaded.model)
    model = strategy.apply(loaded.model, head) if apply_strategy else loaded.model
    return Built(recipe, task, strategy, model, tokenizer, head, loaded.info, time.perf_counter() - t0)


def _task(recipe: Recipe, shared: dict | None):
    m = recipe.model
    key = (m.name, m.revision, m.trust_remote_code, recipe.task.model_dump_json())
    if shared is not None and key in shared:
        return shared[key]
    tokenizer = backbone.load_tokenizer(m)
    task = tasks.get(recipe.task, tokenizer)
    if shared is not None:
        task.keep_encoded = True
        shared[key] = tokenizer, task
    return tokenizer, task
