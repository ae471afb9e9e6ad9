"""Predictions from an exported directory (plain transformers) or a run directory.

    Predictor.load("merged/").predict(["a fine film"])  ->  [{"label": "fresh", "score": 0.93}]

A directory with ``recipe.yaml`` (a run, or an ``--adapter-only`` / non-mergeable export)
is rebuilt by peftkit; any other directory with a ``config.json`` is loaded with
transformers alone, its task kind taken from the model class. One function per task kind
in ``PREDICT``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError

# transformers model class suffix -> task kind, for directories peftkit did not write.
KIND_BY_CLASS = {"ForSequenceClassification": "classification"}


class Predictor:
    def __init__(self, model, tokenizer, kind: str, max_length: int | None = None):
        if kind not in PREDICT:
            raise UserError(f"predict: task kind '{kind}' is not supported (supported: {', '.join(PREDICT)})")
        self.model, self.tokenizer, self.kind, self.max_length = model.eval(), tokenizer, kind, max_length

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Predictor:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: model directory not found")
        if (p / "recipe.yaml").is_file():
            from .export import load_trained

            b = load_trained(p)
            return cls(_to(b.model, device), b.tokenizer, b.recipe.task.kind, getattr(b.recipe.task, "max_length", None))
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: neither an exported model (config.json) nor a peftkit run (recipe.yaml)")
        import transformers

        meta = json.loads((p / "peftkit.json").read_text(encoding="utf-8")) if (p / "peftkit.json").is_file() else {}
        config = transformers.AutoConfig.from_pretrained(p)
        arch = (config.architectures or [""])[0]
        kind = meta.get("task") or next((k for s, k in KIND_BY_CLASS.items() if arch.endswith(s)), None)
        if kind is None or not hasattr(transformers, arch):
            raise UserError(f"{p}: cannot tell the task of model class '{arch}' (known: {', '.join(KIND_BY_CLASS)})")
        model = getattr(transformers, arch).from_pretrained(p, dtype="auto")
        tokenizer = transformers.AutoTokenizer.from_pretrained(p)
        return cls(_to(model, device), tokenizer, kind, meta.get("max_length"))

    def predict(self, texts: list[str], batch_size: int = 32) -> list[dict]:
        if isinstance(texts, str):
            texts = [texts]
        return PREDICT[self.kind](self, list(texts), batch_size)

    def encode(self, texts: list[str]) -> dict:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) for k, v in enc.items()}


def _to(model, device):
    # A 4-bit model is placed at load time (device_map); only plain models move.
    if device is None or getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)


@torch.no_grad()
def classify(pred: Predictor, texts: list[str], batch_size: int) -> list[dict]:
    id2label = pred.model.config.id2label
    out = []
    for k in range(0, len(texts), batch_size):
        probs = pred.model(**pred.encode(texts[k : k + batch_size])).logits.float().softmax(-1)
        score, idx = probs.max(-1)
        out += [{"label": id2label[int(i)], "score": float(s)} for s, i in zip(score, idx)]
    return out


PREDICT = {"classification": classify}
