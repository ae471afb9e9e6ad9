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
    # RoBERTa-base GLUE 4e-4..5e-4 (Hu et al. 2021); the optimum is reported ~10x full fine-tuning's
    # ("LoRA Without Regret", 2025), ~3x in a DistilBERT reproduction: 6e-4..6e-3 is 6x..60x full's 1e-4.
    default_lr = (6e-4, 2e-3, 6e-3)

    def expected_trainable(self, facts):
        c = self.cfg
        if c.bias != "none":
            raise NotImplementedError(f"lora: no trainable-count formula for bias={c.bias}")

        # Default targets: every linear of every block (the arch table's suffixes name exactly those).
        def targeted(lin):
            return not c.target_modules or any(lin.name == t or lin.name.endswith("." + t) for t in c.target_modules)

        # A (in x r) and B (r x out) per adapted linear, and DoRA's magnitude vector (out).
        per_block = sum(c.r * (x.fan_in + x.fan_out) + (x.fan_out if c.dora else 0) for x in facts.block if targeted(x))
        return facts.layers * per_block + facts.head

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
