"""LoRA through peft (rsLoRA and DoRA as options)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftkit import arch
from peftkit.strategies.base import StrategyConfig
from peftkit.strategies.peft_backed import PeftStrategy


def default_targets(model_type: str) -> list[str] | str:
    """The architecture's attention and MLP linears (peft matches a target against the end of
    a module name, so BERT's "output.dense" hits both output projections but not the pooler)."""
    entry = arch.get(model_type)
    return list(entry.lora) if entry and entry.lora else "all-linear"


class LoraConfig(StrategyConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None = per-architecture default
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "lora_only", "all"] = "none"


class Lora(PeftStrategy):
    name = "lora"
    Config = LoraConfig

    def peft_config(self, model, head):
        import peft

        c, entry = self.cfg, arch.of(model)
        return peft.LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules or default_targets(model.config.model_type),
            use_rslora=c.rslora,
            use_dora=c.dora,
            bias=c.bias,
            modules_to_save=list(head) or None,
            fan_in_fan_out=bool(entry and entry.conv1d),
        )
