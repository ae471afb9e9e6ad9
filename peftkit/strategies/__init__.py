"""Strategy registry: adding a strategy is one module and one line here (see docs/ARCHITECTURE.md)."""

from peftkit.strategies.base import Strategy, StrategyConfig, cast_frozen, count_params
from peftkit.strategies.adapter import Adapter
from peftkit.strategies.bitfit import BitFit
from peftkit.strategies.facts import ModelFacts
from peftkit.strategies.freeze import Freeze
from peftkit.strategies.full import Full
from peftkit.strategies.ia3 import IA3
from peftkit.strategies.lora import Lora
from peftkit.strategies.prefix import Prefix
from peftkit.strategies.qlora import QLora

REGISTRY: dict[str, type[Strategy]] = {
    "full": Full,
    "lora": Lora,
    "qlora": QLora,
    "freeze": Freeze,
    "adapter": Adapter,
    "prefix": Prefix,
    "ia3": IA3,
    "bitfit": BitFit,
}


def check_class(key: str, cls: type) -> None:
    """What every registered strategy must declare (TypeError at import otherwise: a missing piece
    would surface later as a search without a grid or a contract test without a formula)."""
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"strategies.REGISTRY['{key}']: {cls!r} is not a Strategy subclass")
    if getattr(cls, "name", None) != key:
        problems.append(f"name = {key!r}")
    if getattr(getattr(cls, "Config", None), "model_fields", {}).get("name") is None:
        problems.append("Config (a StrategyConfig with name: Literal[...])")
    lr = getattr(cls, "default_lr", None)
    if not (isinstance(lr, tuple) and lr and all(isinstance(x, float) and x > 0 for x in lr)):
        problems.append("default_lr (a non-empty tuple of positive floats: the search's default grid)")
    if cls.apply is Strategy.apply:
        problems.append("apply(model, head)")
    if cls.expected_trainable is Strategy.expected_trainable:
        problems.append("expected_trainable(facts) (the contract test's formula)")
    if problems:
        raise TypeError(f"strategy {cls.__name__} ('{key}') must declare: {'; '.join(problems)}")


for _key, _cls in REGISTRY.items():
    check_class(_key, _cls)


def get(cfg: StrategyConfig) -> Strategy:
    return REGISTRY[cfg.name](cfg)


__all__ = ["REGISTRY", "ModelFacts", "Strategy", "StrategyConfig", "cast_frozen", "check_class", "count_params",
           "get"]
