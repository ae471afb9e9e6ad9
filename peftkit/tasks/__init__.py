"""Task registry: one module per task kind, one line here."""

from .base import DataConfig, Task, TaskConfig
from .causal_lm import CausalLM
from .classification import Classification
from .seq2seq import Seq2Seq
from .token_classification import TokenClassification

REGISTRY: dict[str, type[Task]] = {
    "classification": Classification,
    "token_classification": TokenClassification,
    "causal_lm": CausalLM,
    "seq2seq": Seq2Seq,
}


def get(cfg: TaskConfig, tokenizer) -> Task:
    return REGISTRY[cfg.kind](cfg, tokenizer)


__all__ = ["REGISTRY", "DataConfig", "Task", "TaskConfig", "get"]
