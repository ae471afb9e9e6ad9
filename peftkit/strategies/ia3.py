"""(IA)^3 through peft: learned vectors that rescale keys, values and the feed-forward
activations (Liu et al. 2022). Mergeable: the vectors fold into the scaled linears."""

from __future__ import annotations

from typing import Literal

from ..errors import UserError
from .base import Strategy, StrategyConfig
from .modules import KNOWN_TYPES, model_type_of, role_linears


class IA3Config(StrategyConfig):
    """Default targets (per architecture, found by module type): the key and value
    projections (GPT-2: the fused q/k/v projection) and the feed-forward output projection,
    whose input (the intermediate activation) is rescaled."""

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = None  # peft module names; None = the default above
    feedforward_modules: list[str] | None = None  # subset of target_modules scaled at the input


class IA3(Strategy):
    name = "ia3"
    Config = IA3Config
    can_merge = True

    def check(self, recipe):
        problems = super().check(recipe)
        mt = model_type_of(recipe.model.name)
        if not self.cfg.target_modules and mt is not None and mt not in KNOWN_TYPES:
            problems.append(f"strategy 'ia3' has no default targets for '{mt}' models "
                            f"(known: {', '.join(KNOWN_TYPES)}); set strategy.target_modules")
        return problems

    def targets(self, model) -> tuple[list[str], list[str]]:
        c = self.cfg
        if c.target_modules:
            return list(c.target_modules), list(c.feedforward_modules or [])
        if getattr(model.config, "model_type", None) not in KNOWN_TYPES:
            raise UserError(f"strategy 'ia3': no default targets for '{model.config.model_type}' models "
                            f"(known: {', '.join(KNOWN_TYPES)}); set strategy.target_modules")
        # Full module names: precise where a suffix would be ambiguous (BERT's two output.dense).
        ffn = [n for n, _, _ in role_linears(model, "ffn_out")]
        kv = [n for role in ("key", "value") for n, _, _ in role_linears(model, role)]
        return sorted(set(kv + ffn)), ffn

    def apply(self, model, head):
        import peft

        targets, ffn = self.targets(model)
        cfg = peft.IA3Config(
            target_modules=targets,
            feedforward_modules=ffn,
            modules_to_save=list(head) or None,
            fan_in_fan_out=model.config.model_type == "gpt2",
        )
        return peft.get_peft_model(model, cfg)

    def base_model(self, model):
        return model.get_base_model()

    def merge(self, model):
        return model.merge_and_unload()
