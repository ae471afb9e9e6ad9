"""Task registry: one module per task kind, one line here (see docs/ARCHITECTURE.md)."""

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

# What a kind must declare, and what for (TypeError at import: the model card, predict and the CLI read
# these, and a missing one must not become a silent AutoModel / unknown-kind fallback there).
DECLARED = {
    "auto_class_name": str,  # model loading, model card
    "pipeline_tag": str,  # model card
    "model_classes": tuple,  # predict on a directory peftkit did not write
    "echo_key": str,  # peftkit predict --json
}


def check_class(key: str, cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"tasks.REGISTRY['{key}']: {cls!r} is not a Task subclass")
    problems = [] if getattr(cls, "kind", None) == key else [f"kind = {key!r}"]
    if getattr(getattr(cls, "Config", None), "model_fields", {}).get("kind") is None:
        problems.append("Config (a TaskConfig with kind: Literal[...])")
    problems += [f"{attr} ({t.__name__})" for attr, t in DECLARED.items()
                 if not isinstance(getattr(cls, attr, None), t) or getattr(cls, attr) == ""]
    if problems:
        raise TypeError(f"task kind {cls.__name__} ('{key}') must declare: {'; '.join(problems)}")


for _key, _cls in REGISTRY.items():
    check_class(_key, _cls)


def get(cfg: TaskConfig, tokenizer) -> Task:
    return REGISTRY[cfg.kind](cfg, tokenizer)


__all__ = ["REGISTRY", "DataConfig", "Task", "TaskConfig", "check_class", "get"]
