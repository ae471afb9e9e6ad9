"""BitFit (Ben Zaken et al. 2022): only the bias terms (and the task head) train.

Every module's ``bias`` parameter counts: linears, layer norms, GPT-2's Conv1D. Models
without biases (Llama-style decoders: bias-free linears and RMSNorms) are refused at load
time with an error rather than given new zero biases: BitFit there would train the head only.
"""

from typing import Literal

from torch import nn

from peftkit.errors import UserError
from peftkit.strategies.base import Strategy, StrategyConfig, freeze_all, unfreeze


class BitFitConfig(StrategyConfig):
    name: Literal["bitfit"] = "bitfit"


def biases(model: nn.Module, skip: list[str] = ()) -> list[nn.Parameter]:
    """Each module's own ``bias`` parameter, outside the modules named in ``skip``."""
    skipped = {id(p) for name in skip for p in model.get_submodule(name).parameters()}
    out, seen = [], set()
    for m in model.modules():
        b = getattr(m, "bias", None)
        if isinstance(b, nn.Parameter) and id(b) not in skipped and id(b) not in seen:
            seen.add(id(b))
            out.append(b)
    return out


class BitFit(Strategy):
    name = "bitfit"
    Config = BitFitConfig
    can_merge = True  # the trained biases are the model's own parameters
    needs_quantized = False
    # Ben Zaken et al. 2022 searched 1e-4..1e-3 (BERT-base); small models want more.
    default_lr = (1.5e-3, 5e-3, 1.5e-2)

    def expected_trainable(self, facts):
        # The biases of every linear and norm, in and outside the blocks (embeddings have none).
        per_block = sum(x.fan_out for x in facts.block if x.bias) + sum(x.bias for x in facts.block_norms)
        outer = sum(x.bias for x in facts.embed_norms + facts.final_norms)
        return facts.layers * per_block + outer + facts.head

    def apply(self, model, head):
        bs = biases(model, head)
        if not bs:
            where = " outside the task head" if head else ""
            raise UserError(f"strategy 'bitfit': {type(model).__name__} has no bias parameters{where} "
                            f"(bias-free linears and norms, as in Llama or T5); use ia3 or lora")
        freeze_all(model)
        for b in bs:
            b.requires_grad_(True)
        unfreeze(model, head)
        return model
