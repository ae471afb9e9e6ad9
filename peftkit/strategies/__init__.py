"""Strategy registry: adding a strategy is one module and one line here."""

from .base import Strategy, StrategyConfig, count_params
from .full import Full
from .lora import Lora
from .prefix import Prefix
from .qlora import QLora

REGISTRY: dict[str, type[Strategy]] = {
    "full": Full,
    "lora": Lora,
    "qlora": QLora,
    "prefix": Prefix,
}


def get(cfg: StrategyConfig) -> Strategy:
    return REGISTRY[cfg.name](cfg)


__all__ = ["REGISTRY", "Strategy", "StrategyConfig", "count_params", "get"]
