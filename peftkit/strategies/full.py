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
    # BERT fine-tuning 2e-5..5e-5 for 3 epochs (Devlin et al. 2019); short budgets want more.
    default_lr = (3e-5, 1e-4, 3e-4)

    def expected_trainable(self, facts):
        return facts.total

    def apply(self, model, head):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
