"""Full fine-tuning: every parameter trains."""

from typing import Literal

from peftkit.strategies.base import Strategy, StrategyConfig


class FullConfig(StrategyConfig):
    name: Literal["full"] = "full"


class Full(Strategy):
    name = "full"
    Config = FullConfig
    can_merge = True
    needs_quantized = False

    def apply(self, model, head):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
