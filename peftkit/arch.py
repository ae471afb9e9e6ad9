"""Per-architecture facts, one entry per transformers ``model_type`` (cf. peft's
``utils/constants.py``). Every strategy, the FLOP counter and the generation tasks' checks
read this table; adding an architecture is one entry in ``ARCHS``. Model types without an
entry still get their kind (encoder/decoder/seq2seq) from their config (``kind``).

An entry names classes of ``transformers.models.<module>.modeling_<module>`` and attributes
on them, so that modules are found by type (``isinstance``), never by parameter name. Roles:
``q``/``k``/``v`` (projections on the self-attention class; one attribute for all three =
fused), ``attn_out`` and ``ffn_out`` (the output projections of the two sublayers).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from torch import nn

from peftkit.errors import UserError

Kind = Literal["encoder", "decoder", "seq2seq"]
# Attribute on a self-attention module holding its prefix (peftkit.strategies.prefix).
PREFIX_SLOT = "_peftkit_prefix"


@dataclass(frozen=True)
class Arch:
    kind: Kind
    module: str  # transformers.models.<module>.modeling_<module>
    lora: tuple[str, ...] = ()  # LoRA default targets (peft name suffixes); () = "all-linear"
    attention: str | None = None  # self-attention class: holds q/k/v, calls ALL_ATTENTION_FUNCTIONS
    qkv: tuple[str, str, str] = ("", "", "")  # attributes of `attention`
    attn_out: tuple[str, str] | None = None  # (class, attribute)
    ffn_out: tuple[str, str] | None = None  # (class, attribute); IA3 scales its input
    ia3: tuple[str, ...] = ("k", "v", "ffn_out")  # IA3 default roles
    layers: str | None = None  # the transformer block list, a suffix of its module path
    conv1d: bool = False  # GPT-2's Conv1D (weight stored in x out): peft's fan_in_fan_out
    prefix: bool = True  # the attention class takes prefix keys/values (needs `attention`)
    # causal LM: logits = lm_head(decoder's last hidden state), nothing after (chunked_loss.py relies on it)
    plain_lm_head: bool = False

    def role(self, role: str) -> tuple[str, str]:
        """(class name, attribute) of one role's linear; UserError where the entry has none."""
        where = {"attn_out": self.attn_out, "ffn_out": self.ffn_out}.get(role)
        if role in ("q", "k", "v") and self.attention:
            where = (self.attention, self.qkv["qkv".index(role)])
        if not where:
            raise UserError(f"no '{role}' projection known for {self.module} models")
        return where

    @property
    def has_roles(self) -> bool:
        return bool(self.attention and self.attn_out and self.ffn_out)

    def cls(self, name: str) -> type:
        return getattr(importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}"), name)


def _bert_like(p: str, module: str) -> Arch:
    return Arch("encoder", module, lora=("query", "key", "value", "output.dense", "intermediate.dense"),
                attention=f"{p}SelfAttention", qkv=("query", "key", "value"), attn_out=(f"{p}SelfOutput", "dense"),
                ffn_out=(f"{p}Output", "dense"), layers="encoder.layer")


def _llama_like(p: str, module: str) -> Arch:
    return Arch("decoder", module, lora=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                attention=f"{p}Attention", qkv=("q_proj", "k_proj", "v_proj"), attn_out=(f"{p}Attention", "o_proj"),
                ffn_out=(f"{p}MLP", "down_proj"), layers="model.layers", plain_lm_head=True)


ARCHS: dict[str, Arch] = {
    "bert": _bert_like("Bert", "bert"),
    "roberta": _bert_like("Roberta", "roberta"),
    "llama": _llama_like("Llama", "llama"),
    "mistral": _llama_like("Mistral", "mistral"),
    "qwen2": _llama_like("Qwen2", "qwen2"),
    "gpt2": Arch("decoder", "gpt2", lora=("c_attn", "c_proj", "c_fc"), attention="GPT2Attention",
                 qkv=("c_attn",) * 3, attn_out=("GPT2Attention", "c_proj"), ffn_out=("GPT2MLP", "c_proj"),
                 layers="transformer.h", conv1d=True, plain_lm_head=True),
    "phi3": Arch("decoder", "phi3", lora=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), attention="Phi3Attention",
                 qkv=("qkv_proj",) * 3, attn_out=("Phi3Attention", "o_proj"), ffn_out=("Phi3MLP", "down_proj"),
                 layers="model.layers", plain_lm_head=True),
    "t5": Arch("seq2seq", "t5", lora=("q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"), prefix=False),
}
# Builtin backbones whose architecture is known without loading anything.
BUILTIN_TYPES = {"builtin:minilm": "bert", "builtin:smollm2": "llama"}


def with_roles() -> list[str]:
    """Model types whose attention/feed-forward projections are known (adapter, ia3, flops)."""
    return [k for k, a in ARCHS.items() if a.has_roles]


def with_prefix() -> list[str]:
    """Model types whose self-attention takes prefix keys/values."""
    return [k for k, a in ARCHS.items() if a.prefix and a.attention]


def get(model_type: str | None) -> Arch | None:
    return ARCHS.get(model_type or "")


def config_of(model: nn.Module):
    """The transformers config of a model, under a peft wrapper too; its text part for multimodal."""
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = model.get_base_model().config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def of(model: nn.Module) -> Arch | None:
    return get(getattr(config_of(model), "model_type", None))


def _config_json(model_name: str) -> dict | None:
    cfg = Path(model_name).expanduser() / "config.json"
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a hub id, or a directory checked at load time


def model_type_of(model_name: str) -> str | None:
    """The model_type of a recipe's model.name when it is knowable without loading weights."""
    if model_name in BUILTIN_TYPES:
        return BUILTIN_TYPES[model_name]
    return (_config_json(model_name) or {}).get("model_type")


def kind_of(model_name: str) -> Kind | None:
    """``kind`` of a recipe's model.name, read without loading weights (None: not knowable)."""
    if model_name in BUILTIN_TYPES:
        return get(BUILTIN_TYPES[model_name]).kind
    cfg = _config_json(model_name)
    return kind(SimpleNamespace(**cfg)) if isinstance(cfg, dict) else None


def kind(config) -> Kind | None:
    """Encoder, decoder or seq2seq: what the config says outright (``is_encoder_decoder``,
    ``is_decoder``: a BERT built as a decoder is one), else the table's entry, else the
    config's architectures and transformers' auto mappings (masked-LM models are
    bidirectional encoders); None when nothing says."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "is_decoder", False):
        return "decoder"
    entry = get(getattr(config, "model_type", None))
    if entry is not None:
        return entry.kind
    for a in getattr(config, "architectures", None) or ():
        if a.endswith(("ForCausalLM", "LMHeadModel")):
            return "decoder"
        if a.endswith("ForMaskedLM"):
            return "encoder"
    from transformers.models.auto import modeling_auto as auto

    mt = getattr(config, "model_type", None)
    if mt in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if mt in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return None


def linears(model: nn.Module, role: str) -> list[tuple[str, nn.Module, str]]:
    """(qualified name of the linear, its containing module, attribute) for one role, found
    with isinstance against the architecture's transformers classes."""
    entry = of(model)
    if entry is None or not entry.has_roles:
        mt = getattr(config_of(model), "model_type", None)
        raise UserError(f"model type '{mt}' is not supported here (known: {', '.join(with_roles())})")
    cls_name, attr = entry.role(role)
    cls = entry.cls(cls_name)
    return [(f"{n}.{attr}" if n else attr, m, attr) for n, m in model.named_modules() if isinstance(m, cls)]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the entry's ``layers`` path where known, else the
    ModuleList of same-class, parameterised children that holds the most parameters."""
    entry = of(model)
    best, best_n = None, 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(c) for c in m}) != 1:
            continue
        if entry is not None and entry.layers and (name == entry.layers or name.endswith("." + entry.layers)):
            return name, m
        n = sum(p.numel() for p in m.parameters())
        if n > best_n:
            best, best_n = (name, m), n
    if best is None:
        raise UserError(f"{type(model).__name__}: no list of transformer blocks found")
    return best
