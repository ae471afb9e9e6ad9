"""Layer freezing: embeddings and the lowest blocks frozen, everything above them trains."""

from typing import Literal

from peftkit.arch import find_blocks
from peftkit.errors import UserError
from peftkit.strategies.base import Strategy, StrategyConfig, freeze_all, unfreeze


class FreezeConfig(StrategyConfig):
    """``layers: N`` freezes the embeddings and the first N transformer blocks; the later
    blocks, the final norm, the pooler and the task head train. A negative N means "train
    only the last |N| blocks" (the embeddings and all other blocks are frozen). ``layers: 0``
    freezes only the embeddings. |N| larger than the model's block count is an error when
    the model is loaded."""

    name: Literal["freeze"] = "freeze"
    layers: int = -2


class Freeze(Strategy):
    name = "freeze"
    Config = FreezeConfig
    can_merge = True  # nothing to merge: the trained weights are the model's own
    needs_quantized = False
    default_lr = (3e-5, 1e-4, 3e-4)  # as full fine-tuning: the trained weights are the model's own

    def expected_trainable(self, facts):
        n = self.cfg.layers
        trained = facts.layers - n if n >= 0 else -n
        # The blocks above the frozen ones, the norms after the blocks, the head.
        return trained * facts.block_params + sum(x.weight + x.bias for x in facts.final_norms) + facts.head

    def frozen_blocks(self, n_blocks: int) -> int:
        n = self.cfg.layers
        if abs(n) > n_blocks:
            raise UserError(f"strategy.layers: {n} but the model has only {n_blocks} transformer blocks")
        return n if n >= 0 else n_blocks + n

    def apply(self, model, head):
        _, blocks = find_blocks(model)
        k = self.frozen_blocks(len(blocks))
        # Parameters registered before the block list (embeddings, their norm) are below the
        # blocks; those registered after it (final norm, pooler, head) are above them.
        freeze_all(model)
        in_blocks = {id(p) for p in blocks.parameters()}
        above = False
        for p in model.parameters():
            if id(p) in in_blocks:
                above = True
            elif above:
                p.requires_grad_(True)
        for block in blocks[k:]:
            for p in block.parameters():
                p.requires_grad_(True)
        model.get_input_embeddings().weight.requires_grad_(False)
        unfreeze(model, head)
        return model
