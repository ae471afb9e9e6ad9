"""Strategy registry: adding a strategy is one module and one line here."""

from peftkit.strategies.base import Strategy, StrategyConfig, cast_frozen, count_params
from peftkit.strategies.adapter import Adapter
from peftkit.strategies.bitfit import BitFit
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


def get(cfg: StrategyConfig) -> Strategy:
    return REGISTRY[cfg.name](cfg)


__all__ = ["REGISTRY", "Strategy", "StrategyConfig", "cast_frozen", "count_params", "get"]
