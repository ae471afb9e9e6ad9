"""Offline architecture catalogue: published config.json hyper-parameters, no weights, no tokenizer.

``model.name=catalog:llama-3.1-8b`` names ``<name>.json`` here; the estimate builds such a
model on the meta device, so planning for a 70B model needs neither the weights nor a network.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import UserError

PREFIX = "catalog:"
HERE = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json"))


def resolve_config(name: str):
    """The transformers config of a ``catalog:`` name, or None for any other model name."""
    if not name.startswith(PREFIX):
        return None
    key = name[len(PREFIX):].lower()
    path = HERE / f"{key}.json"
    if not path.is_file():
        raise UserError(f"model.name: '{name}' is not in the catalogue; known: {', '.join(names())}")
    from transformers import AutoConfig

    d = json.loads(path.read_text())
    return AutoConfig.for_model(d.pop("model_type"), **d)
