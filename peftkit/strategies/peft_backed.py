"""The shared base of strategies that peft implements (lora, qlora, ia3): preparing and
wrapping the model, the base model under the wrapper, merging. Subclasses only say which ``peft.PeftConfig`` to build."""

from __future__ import annotations

from torch import nn

from peftkit.errors import UserError
from peftkit.strategies.base import Strategy


def _tuner_layer() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """peft's injected layers (LoRA, IA3, ...) and its copies of the trained task head,
    found by their classes."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, (_tuner_layer(), AuxiliaryTrainingWrapper))]


class PeftStrategy(Strategy):
    can_merge = True

    def peft_config(self, model: nn.Module, head: list[str]):
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        """Hook before wrapping (qlora: peft's k-bit preparation)."""
        return model

    def apply(self, model, head):
        import peft

        model = self.prepare(model)
        cfg = self.peft_config(model, head)
        try:
            return peft.get_peft_model(model, cfg)
        except peft.NoMatchingPeftModuleError:
            t = cfg.target_modules
            raise UserError(f"strategy.target_modules: {t if isinstance(t, str) else sorted(t)} match no module "
                            f"of {type(model).__name__}") from None

    def base_model(self, model):
        return model.get_base_model()

    def merge(self, model):
        return model.merge_and_unload()
