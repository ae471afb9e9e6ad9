"""What a strategy's expected trainable-parameter count is computed from.

``ModelFacts.of(model, head)`` reads a model *before* a strategy is applied: sizes from its
config, and the shapes of modules found by type (the linears and norms of one transformer
block, the norms outside the blocks, the q/k/v and feed-forward projections named in
``peftkit.arch``). Never ``requires_grad``: a strategy's ``expected_trainable(facts)`` is then
a second statement of what it trains, written from the method's definition, which the
contract test (``tests/strategies/test_contract.py``) holds against what ``apply`` really did.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit import arch
from peftkit.strategies.base import count_params


@dataclass(frozen=True)
class Linear:
    name: str  # path inside its block (``attention.self.query``)
    fan_in: int
    fan_out: int
    bias: bool


@dataclass(frozen=True)
class Norm:
    weight: int
    bias: int


@dataclass(frozen=True)
class ModelFacts:
    model_type: str | None
    layers: int  # transformer blocks
    hidden: int
    kv: int  # key/value width per layer: kv heads x head dim (below ``hidden`` under grouped-query attention)
    block: tuple[Linear, ...]  # every linear layer of one block, in module order
    block_norms: tuple[Norm, ...]
    block_params: int  # all parameters of one block
    embed_norms: tuple[Norm, ...]  # norms outside the blocks, before them (BERT's embedding norm)
    final_norms: tuple[Norm, ...]  # after them (a decoder's final norm); the task head excluded
    kv_out: int | None  # output width of the key and value projections, a fused q/k/v counted once
    ffn_in: int | None  # input width of the feed-forward output projection
    head: int  # parameters of the task head (new, always trainable)
    total: int  # every parameter of the model as loaded

    @property
    def norms(self) -> tuple[Norm, ...]:
        """Every norm of the model outside the head."""
        return self.block_norms * self.layers + self.embed_norms + self.final_norms

    @classmethod
    def of(cls, model: nn.Module, head: list[str]) -> ModelFacts:
        cfg = arch.config_of(model)
        blocks_name, blocks = arch.find_blocks(model)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
        embed, final = _outer_norms(model, blocks_name, head)
        kv_out, ffn_in = _role_widths(model, blocks[0])
        head_params = {id(p): p.numel() for name in head for p in model.get_submodule(name).parameters()}
        return cls(
            model_type=getattr(cfg, "model_type", None), layers=len(blocks), hidden=cfg.hidden_size,
            kv=head_dim * (getattr(cfg, "num_key_value_heads", None) or heads),
            block=tuple(Linear(n, *_width(m), _bias(m)) for n, m in blocks[0].named_modules() if _is_linear(m)),
            block_norms=tuple(_norm(m) for m in blocks[0].modules() if _is_norm(m)),
            block_params=sum(p.numel() for p in blocks[0].parameters()),
            embed_norms=embed, final_norms=final, kv_out=kv_out, ffn_in=ffn_in,
            head=sum(head_params.values()), total=count_params(model)[1])


def _is_linear(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))  # bitsandbytes' Linear4bit/8bitLt are nn.Linear too


def _width(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear; GPT-2's Conv1D stores its weight as in x out."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.weight.shape[0], m.nf


def _bias(m: nn.Module) -> bool:
    return isinstance(getattr(m, "bias", None), nn.Parameter)


def _is_norm(m: nn.Module) -> bool:
    # Llama-style RMSNorms and T5's LayerNorm are transformers' own classes, not nn.LayerNorm.
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _norm(m: nn.Module) -> Norm:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    return Norm(w.numel() if isinstance(w, nn.Parameter) else 0, b.numel() if isinstance(b, nn.Parameter) else 0)


def _outer_norms(model: nn.Module, blocks_name: str, head: list[str]) -> tuple[tuple[Norm, ...], tuple[Norm, ...]]:
    """Norms outside the blocks and the head: (before the blocks, after them) in module order."""
    before, after, passed = [], [], False
    inside = [blocks_name, *head]
    for name, m in model.named_modules():
        if name == blocks_name:
            passed = True
        if any(name == p or name.startswith(p + ".") for p in inside) or not _is_norm(m):
            continue
        (after if passed else before).append(_norm(m))
    return tuple(before), tuple(after)


def _role_widths(model: nn.Module, block: nn.Module) -> tuple[int | None, int | None]:
    """(key+value output width, feed-forward output projection's input width) from the arch table."""
    entry = arch.of(model)
    if entry is None or not entry.has_roles:
        return None, None

    def role(r: str) -> nn.Module:
        cls_name, attr = entry.role(r)
        owner = next(m for m in block.modules() if isinstance(m, entry.cls(cls_name)))
        return getattr(owner, attr)

    kv = {id(m): _width(m)[1] for m in (role("k"), role("v"))}  # fused: one module, counted once
    return sum(kv.values()), _width(role("ffn_out"))[0]
