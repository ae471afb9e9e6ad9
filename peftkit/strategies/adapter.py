"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), our own small version.

Each adapter is ``x + up(act(down(x)))`` with ``down: d -> b`` and ``up: b -> d``, applied to
the output of a sublayer's output projection, before the residual connection:
houlsby = after the attention output projection and after the feed-forward block,
pfeiffer = after the feed-forward block only. ``up`` starts at zero, so the adapted model
starts out computing exactly what the base model computes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit import arch
from peftkit.errors import UserError
from peftkit.strategies.base import Strategy, StrategyConfig, freeze_all, unfreeze

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterConfig(StrategyConfig):
    """Bottleneck width: ``bottleneck`` if given, else hidden size // ``reduction_factor``."""

    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    bottleneck: int | None = Field(None, ge=1)
    reduction_factor: int = Field(16, ge=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "gelu"
    # Houlsby et al. (2019) also train the layer norms (2 x hidden size per norm; MiniLM: 9,984).
    train_norms: bool = False


class Bottleneck(nn.Module):
    """The adapter: residual bottleneck MLP, fp32 parameters whatever the backbone dtype."""

    def __init__(self, d: int, b: int, activation: str):
        super().__init__()
        self.down = nn.Linear(d, b)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(b, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.act(self.down(x.to(self.down.weight.dtype))))
        return x + h.to(x.dtype)


class Adapted(nn.Module):
    """A frozen output projection followed by its adapter (replaces the projection in place)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    # Some modeling code reads the projection's weight/bias (dtype checks): forward them.
    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x, *args, **kwargs):
        return self.adapter(self.base(x, *args, **kwargs))


def _out_features(linear: nn.Module) -> int:
    # nn.Linear / bitsandbytes Linear4bit have out_features; GPT-2's Conv1D has nf.
    return getattr(linear, "out_features", None) or linear.nf


class Adapter(Strategy):
    name = "adapter"
    Config = AdapterConfig
    can_merge = False  # the nonlinear bottleneck cannot be folded into linear weights
    # Houlsby et al. 2019 searched 3e-5..3e-3 (Pfeiffer adapters commonly 1e-4..1e-3).
    default_lr = (3e-4, 1e-3, 3e-3)

    def expected_trainable(self, facts):
        c, d = self.cfg, facts.hidden
        b = c.bottleneck or max(1, d // c.reduction_factor)
        # Per adapter: down (d x b + b) and up (b x d + d); one per placement role per block.
        n = facts.layers * len(self.roles()) * (2 * d * b + b + d)
        if c.train_norms:
            n += sum(x.weight + x.bias for x in facts.norms)
        return n + facts.head

    def check(self, recipe):
        problems = super().check(recipe)
        mt = arch.model_type_of(recipe.model.name)
        entry = arch.get(mt)
        if mt is not None and not (entry and entry.has_roles):
            known = ", ".join(arch.with_roles())
            problems.append(f"strategy 'adapter' does not know where to put adapters in '{mt}' models "
                            f"(known: {known})")
        return problems

    def roles(self) -> list[str]:
        return ["attn_out", "ffn_out"] if self.cfg.placement == "houlsby" else ["ffn_out"]

    def apply(self, model, head):
        c = self.cfg
        freeze_all(model)
        found = [x for role in self.roles() for x in arch.linears(model, role)]
        if not found:
            raise UserError(f"strategy 'adapter': no attention/feed-forward blocks found in {type(model).__name__}")
        for _, parent, attr in found:
            linear = getattr(parent, attr)
            d = _out_features(linear)
            b = c.bottleneck or max(1, d // c.reduction_factor)
            adapter = Bottleneck(d, b, c.activation).to(next(linear.parameters()).device)
            setattr(parent, attr, Adapted(linear, adapter))
        for a in adapters(model):
            a.requires_grad_(True)
        if c.train_norms:
            for m in norms(model):
                m.requires_grad_(True)
        unfreeze(model, head)
        return model

    def merge(self, model):
        raise NotImplementedError("strategy 'adapter' cannot be merged: its nonlinear bottleneck "
                                  "cannot be folded into the base weights")


def adapters(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def norms(model: nn.Module) -> list[nn.Module]:
    """LayerNorm / RMSNorm modules, by type (transformers' Llama-style RMSNorms are their own classes)."""
    kinds = tuple(k for k in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if k is not None)
    return [m for m in model.modules() if isinstance(m, kinds) or type(m).__name__.endswith("RMSNorm")]
