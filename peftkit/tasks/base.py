"""The task contract and the data section shared by every task kind.

A task knows its data, its collator, its head and its metric; it never looks at strategies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from ..config import Section
from ..errors import DataError


class DataConfig(Section):
    source: str | None = None  # builtin:NAME, or a hub dataset name; None = use the files below
    dir: str | None = None  # files below are relative to this (override-able: task.data.dir=...)
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "conll"] = "auto"
    # Splits that have no file are cut from train by a seeded fraction.
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    def path(self, split: str) -> Path | None:
        name = getattr(self, split)
        if name is None:
            return None
        p = Path(name)
        return Path(self.dir) / p if self.dir and not p.is_absolute() else p


class TaskConfig(Section):
    kind: str
    data: DataConfig = DataConfig()
    max_length: int = Field(128, ge=8)


class Task:
    """Subclasses set ``kind`` and ``Config`` and implement the methods below."""

    kind: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]
    # Names of the task head modules on the model (new, always trainable).
    head_names: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = "loss"

    def __init__(self, cfg: TaskConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.truncated = 0  # examples cut to max_length, counted while tokenizing
        self._raw = None  # raw splits, read once

    @classmethod
    def check(cls, recipe) -> list[str]:
        return []

    def auto_class(self):
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Extra from_pretrained/from_config kwargs (e.g. num_labels)."""
        return {}

    def head(self, model) -> list[str]:
        return [n for n in self.head_names if hasattr(model, n)]

    def datasets(self) -> dict:
        """Tokenized splits: {'train', 'validation', 'test'} -> datasets.Dataset."""
        raise NotImplementedError

    def collate(self, features: list[dict]) -> dict:
        raise NotImplementedError

    def eval_step(self, model, batch) -> tuple[list, list]:
        """Predictions and references of one batch, as python lists."""
        raise NotImplementedError

    def metrics(self, preds: list, refs: list) -> dict[str, float]:
        raise NotImplementedError

    def logit_mask(self, batch):
        """Bool [B, T]: the positions whose logits are predictions (``export --verify`` compares
        those); None when the model gives one row of logits per example."""
        return None

    def info(self) -> dict[str, Any]:
        """What result.json records about the task (label names, sizes, truncation)."""
        return {}


def require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"columns present: {', '.join(ds.column_names)}"
        )
