"""(IA)^3 through peft: learned vectors that rescale keys, values and the feed-forward
activations (Liu et al. 2022). Mergeable: the vectors fold into the scaled linears."""

from __future__ import annotations

from typing import Literal

from peftkit import arch
from peftkit.errors import UserError
from peftkit.strategies.base import StrategyConfig
from peftkit.strategies.peft_backed import PeftStrategy


class IA3Config(StrategyConfig):
    """Default targets (per architecture, ``peftkit.arch``, found by module type): the key and
    value projections (fused q/k/v where the architecture fuses them) and the feed-forward
    output projection, whose input (the intermediate activation) is rescaled."""

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = None  # peft module names; None = the default above
    feedforward_modules: list[str] | None = None  # subset of target_modules scaled at the input


def _no_default(model_type) -> str:
    known = ", ".join(arch.with_roles())
    return (f"strategy 'ia3' has no default targets for '{model_type}' models "
            f"(known: {known}); set strategy.target_modules")


class IA3(PeftStrategy):
    name = "ia3"
    Config = IA3Config
    # T-Few (Liu et al. 2022) 3e-3; peft's method comparison 1e-3..5e-3.
    default_lr = (3e-3, 1e-2, 3e-2)

    def expected_trainable(self, facts):
        c = self.cfg
        if c.target_modules:  # one vector per target: its input width if feed-forward, else its output width
            ffn = set(c.feedforward_modules or ())

            def hits(lin, names):
                return any(lin.name == t or lin.name.endswith("." + t) for t in names)

            per_block = sum(x.fan_in if hits(x, ffn) else x.fan_out for x in facts.block if hits(x, c.target_modules))
        else:  # rescaled keys and values, and the feed-forward activation
            per_block = facts.kv_out + facts.ffn_in
        return facts.layers * per_block + facts.head

    def check(self, recipe):
        problems = super().check(recipe)
        mt = arch.model_type_of(recipe.model.name)
        entry = arch.get(mt)
        if not self.cfg.target_modules and mt is not None and not (entry and entry.has_roles):
            problems.append(_no_default(mt))
        return problems

    def targets(self, model) -> tuple[list[str], list[str]]:
        c = self.cfg
        if c.target_modules:
            return list(c.target_modules), list(c.feedforward_modules or [])
        entry = arch.of(model)
        if not (entry and entry.has_roles):
            raise UserError(_no_default(getattr(arch.config_of(model), "model_type", None)))
        # Full module names: precise where a suffix would be ambiguous (BERT's two output.dense).
        found = {role: [n for n, _, _ in arch.linears(model, role)] for role in entry.ia3}
        return sorted({n for names in found.values() for n in names}), found.get("ffn_out", [])

    def peft_config(self, model, head):
        import peft

        targets, ffn = self.targets(model)
        entry = arch.of(model)
        return peft.IA3Config(
            target_modules=targets,
            feedforward_modules=ffn,
            modules_to_save=list(head) or None,
            fan_in_fan_out=bool(entry and entry.conv1d),
        )
