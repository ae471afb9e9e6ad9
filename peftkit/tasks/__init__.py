"""Task registry: one module per task kind, one line here."""

from .base import DataConfig, Task, TaskConfig
from .classification import Classification

REGISTRY: dict[str, type[Task]] = {
    "classification": Classification,
}


def get(cfg: TaskConfig, tokenizer) -> Task:
    return REGISTRY[cfg.kind](cfg, tokenizer)


__all__ = ["REGISTRY", "DataConfig", "Task", "TaskConfig", "get"]
