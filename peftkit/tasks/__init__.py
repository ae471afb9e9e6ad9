"""Task registry: one module per task kind, one line here."""

from peftkit.tasks.base import DataConfig, Task, TaskConfig
from peftkit.tasks.causal_lm import CausalLM
from peftkit.tasks.classification import Classification
from peftkit.tasks.seq2seq import Seq2Seq
from peftkit.tasks.token_classification import TokenClassification

REGISTRY: dict[str, type[Task]] = {
    "classification": Classification,
    "token_classification": TokenClassification,
    "causal_lm": CausalLM,
    "seq2seq": Seq2Seq,
}


def get(cfg: TaskConfig, tokenizer) -> Task:
    return REGISTRY[cfg.kind](cfg, tokenizer)


__all__ = ["REGISTRY", "DataConfig", "Task", "TaskConfig", "get"]
