"""LoRA through peft (rsLoRA and DoRA as options)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Strategy, StrategyConfig

# Attention and MLP linears per architecture. peft matches a target against the end of a
# module name, so "output.dense" hits both BERT output projections but not "pooler.dense".
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "roberta": ["query", "key", "value", "output.dense", "intermediate.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"],
}


def default_targets(model_type: str) -> list[str] | str:
    return DEFAULT_TARGETS.get(model_type, "all-linear")


class LoraConfig(StrategyConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None = per-architecture default
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "lora_only", "all"] = "none"


class Lora(Strategy):
    name = "lora"
    Config = LoraConfig
    can_merge = True

    def peft_config(self, model, head):
        import peft

        c = self.cfg
        return peft.LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=c.target_modules or default_targets(model.config.model_type),
            use_rslora=c.rslora,
            use_dora=c.dora,
            bias=c.bias,
            modules_to_save=list(head) or None,
            fan_in_fan_out=model.config.model_type == "gpt2",
        )

    def prepare(self, model):
        return model

    def apply(self, model, head):
        import peft

        model = self.prepare(model)
        return peft.get_peft_model(model, self.peft_config(model, head))

    def base_model(self, model):
        return model.get_base_model()

    def merge(self, model):
        return model.merge_and_unload()
