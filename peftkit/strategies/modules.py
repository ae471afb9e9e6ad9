"""Finding a model's parts by type and structure: transformer blocks, and per-architecture
roles of linears (attention output, feed-forward output, keys, values) by their modules' classes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from torch import nn

from ..errors import UserError

# model_type -> role -> (containing class in transformers.models.<type>.modeling_<type>, attribute).
_ATTN_FFN = {
    "bert": ("Bert", {"attn_out": ("SelfOutput", "dense"), "ffn_out": ("Output", "dense"),
                      "query": ("SelfAttention", "query"), "key": ("SelfAttention", "key"),
                      "value": ("SelfAttention", "value")}),
    "gpt2": ("GPT2", {"attn_out": ("Attention", "c_proj"), "ffn_out": ("MLP", "c_proj"),
                      "query": ("Attention", "c_attn"), "key": ("Attention", "c_attn"),
                      "value": ("Attention", "c_attn")}),  # fused q,k,v
}
_DECODER = {"attn_out": ("Attention", "o_proj"), "ffn_out": ("MLP", "down_proj"),
            "query": ("Attention", "q_proj"), "key": ("Attention", "k_proj"), "value": ("Attention", "v_proj")}
_ATTN_FFN |= {"roberta": ("Roberta", _ATTN_FFN["bert"][1]), "llama": ("Llama", _DECODER),
              "mistral": ("Mistral", _DECODER), "qwen2": ("Qwen2", _DECODER)}
KNOWN_TYPES = tuple(_ATTN_FFN)

# Builtin backbones whose architecture is known without loading anything.
_BUILTIN_TYPES = {"builtin:minilm": "bert", "builtin:smollm2": "llama"}


def model_type_of(model_name: str) -> str | None:
    """The model_type of a recipe's model.name when it is knowable without loading weights."""
    if model_name in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[model_name]
    cfg = Path(model_name).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None  # a hub id, or a directory checked at load time


def role_linears(model: nn.Module, role: str) -> list[tuple[str, nn.Module, str]]:
    """(qualified name of the linear, its containing module, attribute) for one role.

    Containers are matched with isinstance against the architecture's transformers classes.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ATTN_FFN:
        raise UserError(f"model type '{model_type}' is not supported here (known: {', '.join(KNOWN_TYPES)})")
    prefix, roles = _ATTN_FFN[model_type]
    cls_name, attr = roles[role]
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cls = getattr(mod, prefix + cls_name)
    return [(f"{n}.{attr}" if n else attr, m, attr) for n, m in model.named_modules() if isinstance(m, cls)]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the ModuleList of same-class, parameterised children that
    holds the most parameters (encoder or decoder layers of any architecture)."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > best_n:
            best, best_n = (name, m), n
    if best is None:
        raise UserError(f"{type(model).__name__}: no list of transformer blocks found")
    return best
