"""Strategy registry: adding a strategy is one module and one line here."""

from .base import Strategy, StrategyConfig, cast_frozen, count_params
from .adapter import Adapter
from .bitfit import BitFit
from .freeze import Freeze
from .full import Full
from .ia3 import IA3
from .lora import Lora
from .prefix import Prefix
from .qlora import QLora

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


def get(cfg: StrategyConfig) -> Strategy:
    return REGISTRY[cfg.name](cfg)


__all__ = ["REGISTRY", "Strategy", "StrategyConfig", "cast_frozen", "count_params", "get"]
