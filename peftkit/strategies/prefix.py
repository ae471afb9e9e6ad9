"""Prefix tuning (Li & Liang 2021): learned key/value prefixes in every self-attention layer.

transformers 5 routes every attention call through ``AttentionInterface``; this module
registers two attention functions (``peftkit_prefix_sdpa``, ``peftkit_prefix_eager``) that
prepend a layer's prefix keys/values on the key axis, extend the mask so the prefix is
visible to every query (padding and causality of the real tokens unchanged), and call the
stock SDPA or the model's own eager kernel. That works for encoders (BERT) as well as
decoders, where peft's past-key-values route refuses encoders under transformers 5.

The prefix parameters live in a :class:`PrefixEncoder` attached to the model, so the
optimizer, accelerate, ``.to()`` and ``count_params`` see them. With ``reparameterize``
the prefix is an MLP of a smaller embedding during training (the paper's stabiliser);
:meth:`Prefix.state_dict` saves the MLP's output as one plain table, as the paper does
once training is over: it is what inference needs, and it is 10-30x smaller than the MLP.
"""

from __future__ import annotations

import sys
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit import arch
from peftkit.errors import UserError
from peftkit.strategies.base import Strategy, StrategyConfig, freeze_all, unfreeze

IMPL = {"sdpa": "peftkit_prefix_sdpa", "eager": "peftkit_prefix_eager"}


class PrefixConfig(StrategyConfig):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(16, ge=1)
    reparameterize: bool = False  # train the prefix through an MLP (Li & Liang 2021)
    hidden: int = Field(512, ge=1)  # MLP hidden size when reparameterize
    init_std: float = Field(1.0, gt=0)  # std of the random prefix (or of its MLP input)


class PrefixEncoder(nn.Module):
    """All prefixes of a model: ``forward()`` -> (layers, 2, kv_heads, tokens, head_dim)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, tokens: int, d_model: int,
                 reparameterize: bool, hidden: int, init_std: float):
        super().__init__()
        self.shape = (layers, 2, kv_heads, tokens, head_dim)
        self.mlp = None
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(tokens, d_model) * init_std)
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, layers * 2 * kv_heads * head_dim))
        else:
            self.table = nn.Parameter(torch.randn(self.shape) * init_std)
        # This forward pass's table, kept (not cleared after the forward) so that gradient
        # checkpointing recomputes layers with the very same tensor.
        self._current: torch.Tensor | None = None
        self._versions: list[int] = []

    def forward(self) -> torch.Tensor:
        if self.mlp is None:
            return self.table
        layers, _, kv, tokens, d = self.shape
        # (tokens, layers*2*kv*d) -> (layers, 2, kv, tokens, d)
        return self.mlp(self.embedding).view(tokens, layers, 2, kv, d).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def materialize(self) -> None:
        """Replace the MLP by the plain table it produces (trainable, same outputs)."""
        if self.mlp is not None:
            table = self().detach().clone().contiguous()
            del self.mlp, self.embedding
            self.mlp = None
            self.table = nn.Parameter(table)

    def refresh(self) -> torch.Tensor:
        self._current = self()
        self._versions = [p._version for p in self.parameters()]
        return self._current

    def layer(self, i: int) -> torch.Tensor:
        t = self._current
        # Stale after an optimizer step or a switch into grad mode: compute again.
        if (t is None or self._versions != [p._version for p in self.parameters()]
                or (torch.is_grad_enabled() and not t.requires_grad and self.table_requires_grad())):
            t = self.refresh()
        return t[i]

    def table_requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


class _Slot:
    """Plain (non-Module) attribute ``arch.PREFIX_SLOT`` on an attention module: which prefix
    it uses; ``tokens`` and ``trains`` are what the FLOP counter reads."""

    def __init__(self, encoder: PrefixEncoder, index: int):
        self.encoder, self.index = encoder, index

    @property
    def tokens(self) -> int:
        return self.encoder.shape[3]

    @property
    def trains(self) -> bool:
        return self.encoder.table_requires_grad()


def _extend_mask(mask, tokens: int, query, kv_len: int, causal: bool, additive: bool):
    """Prepend ``tokens`` always-visible key columns to a 4-D bool/float mask (or None).

    A None mask of a causal layer becomes an explicit one (bool, or additive float for
    eager kernels): SDPA's ``is_causal`` would align the causal triangle top-left and hide
    real tokens behind the prefix.
    """
    q_len = query.shape[2]
    if mask is None:
        if not (causal and q_len > 1):
            return None
        # Bottom-right aligned over the real keys: a cache may hold earlier tokens.
        i = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= i)[None, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    if mask.ndim != 4:
        raise RuntimeError(f"prefix attention expects a 4-D attention mask, got shape {tuple(mask.shape)}")
    fill = True if mask.dtype == torch.bool else 0.0
    pad = torch.full((*mask.shape[:3], tokens), fill, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def _prefix_attention(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as kernel
        else:
            kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if kernel is None:
                raise RuntimeError(f"prefix: {type(module).__name__} has no eager_attention_forward; use sdpa")
        slot = getattr(module, arch.PREFIX_SLOT, None)
        if slot is None:  # cross-attention and other modules without a prefix
            return kernel(module, query, key, value, attention_mask, *args, **kwargs)
        kv = slot.encoder.layer(slot.index)  # (2, kv_heads, tokens, head_dim)
        if key.shape[1] != kv.shape[1] or key.shape[-1] != kv.shape[-1]:
            raise RuntimeError(f"prefix of layer {slot.index} has {kv.shape[1]} heads x {kv.shape[-1]} dims, "
                               f"but {type(module).__name__} gives keys {tuple(key.shape)}")
        b, tokens, kv_len = key.shape[0], kv.shape[2], key.shape[2]
        # Keys/values arrive before repeat_kv (b, kv_heads, seq, d): the kernel repeats them.
        kv = kv.to(key.dtype).unsqueeze(1).expand(2, b, *kv.shape[1:])
        key = torch.cat([kv[0], key], dim=2)
        value = torch.cat([kv[1], value], dim=2)
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        attention_mask = _extend_mask(attention_mask, tokens, query, kv_len, bool(causal), base == "eager")
        return kernel(module, query, key, value, attention_mask, *args, **kwargs)

    return attention


def register() -> None:
    """Register the prefix attention functions and their mask builders with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for base, name in IMPL.items():
        AttentionInterface.register(name, _prefix_attention(base))
        AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)


def _attention_class(model_type: str) -> type | None:
    entry = arch.get(model_type)
    return entry.cls(entry.attention) if entry and entry.prefix and entry.attention else None


def _unsupported(model_type) -> str:
    return (f"strategy 'prefix' supports model types {', '.join(arch.with_prefix())}; "
            f"this model is '{model_type}'")


def find_encoder(model: nn.Module) -> tuple[str, PrefixEncoder]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, PrefixEncoder)]
    if len(found) != 1:
        raise ValueError(f"expected one prefix encoder on the model, found {len(found)}")
    return found[0]


class Prefix(Strategy):
    name = "prefix"
    Config = PrefixConfig
    can_merge = False  # a prefix adds keys/values; it cannot be folded into weights
    # P-tuning v2 (Liu et al. 2022) 5e-3..1e-2 on classification.
    default_lr = (3e-3, 1e-2, 3e-2)

    def expected_trainable(self, facts):
        c = self.cfg
        width = facts.layers * 2 * facts.kv  # a key and a value per virtual token per layer
        if not c.reparameterize:
            return c.num_virtual_tokens * width + facts.head
        # The MLP of Li & Liang: embedding (tokens x hidden) -> tanh(hidden -> c.hidden) -> width.
        return (c.num_virtual_tokens * facts.hidden + facts.hidden * c.hidden + c.hidden
                + c.hidden * width + width + facts.head)

    def check(self, recipe) -> list[str]:
        problems = super().check(recipe)
        mt = arch.model_type_of(recipe.model.name)
        if mt is not None and mt not in arch.with_prefix():
            problems.append(_unsupported(mt) + f" (model.name={recipe.model.name})")
        if recipe.model.attn_implementation == "flash_attention_2":
            problems.append("strategy 'prefix' runs on sdpa or eager attention, "
                            "not model.attn_implementation=flash_attention_2")
        return problems

    def apply(self, model, head):
        c = self.cfg
        cfg = model.config.get_text_config()
        cls = _attention_class(cfg.model_type)
        if cls is None:
            raise UserError(_unsupported(cfg.model_type))
        if any(isinstance(m, PrefixEncoder) for m in model.modules()):
            raise ValueError("prefix tuning is already applied to this model")
        attn = [m for m in model.modules() if isinstance(m, cls) and not getattr(m, "is_cross_attention", False)]
        if not attn:
            raise UserError(f"prefix: no {cls.__name__} modules found in {type(model).__name__}")
        # Keys reach the kernel before repeat_kv: kv heads = heads / the module's GQA group size.
        a = attn[0]
        kv_heads = cfg.num_attention_heads // getattr(a, "num_key_value_groups", 1)
        head_dim = getattr(a, "head_dim", None) or a.attention_head_size
        freeze_all(model)
        param = next(model.parameters())
        enc = PrefixEncoder(len(attn), kv_heads, head_dim, c.num_virtual_tokens, cfg.hidden_size,
                            c.reparameterize, c.hidden, c.init_std).to(param.device)
        model.add_module("prefix_encoder", enc)
        # One index per module in traversal order: unique even where layer_idx is shared or absent.
        for i, m in enumerate(attn):
            setattr(m, arch.PREFIX_SLOT, _Slot(enc, i))

        # The MLP runs once per forward, outside any gradient-checkpointed layer.
        def refresh(mod, args):  # returns None: a pre-hook's return value would replace the inputs
            enc.refresh()

        model.register_forward_pre_hook(refresh)

        register()
        current = model.config._attn_implementation
        impl = IMPL["eager" if current == "eager" else "sdpa"]
        model.set_attn_implementation(impl)
        if model.config._attn_implementation != impl:
            raise UserError(f"prefix: {type(model).__name__} cannot switch its attention implementation")
        unfreeze(model, head)
        return model

    def state_dict(self, model):
        name, enc = find_encoder(model)
        own = {id(p) for p in enc.parameters()}
        sd = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and id(p) not in own}
        with torch.no_grad():
            sd[f"{name}.table"] = enc().detach()
        return sd

    def load_state_dict(self, model, sd):
        name, enc = find_encoder(model)
        t = sd.get(f"{name}.table")
        if t is None or tuple(t.shape) != enc.shape:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"strategy weights do not fit the model: prefix table {got}, expected {enc.shape}")
        enc.materialize()
        super().load_state_dict(model, sd)

