"""Sequence classification (one text or a text pair -> one label); accuracy and macro-F1."""

from __future__ import annotations

from typing import Literal

import torch

from ..assets import locate
from ..errors import DataError
from .base import DataConfig, Task, TaskConfig, require_columns
from .data import load_splits

BUILTIN_LABELS = {"builtin:rotten-tomatoes": ["rotten", "fresh"]}


class ClassificationConfig(TaskConfig):
    kind: Literal["classification"] = "classification"
    data: DataConfig = DataConfig(source="builtin:rotten-tomatoes")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; None = inferred from train


def rotten_tomatoes(name: str):
    """Critic snippets labelled fresh/rotten; duplicate texts dropped; grouped by film."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("csv", data_files=str(locate(name)), split="train", keep_default_na=False)
    seen: set[str] = set()
    keep = []
    for i, (cat, text) in enumerate(zip(ds["category"], ds["text"])):
        if cat in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            keep.append(i)
    ds = ds.select(keep).rename_column("category", "label")
    return ds.select_columns(["text", "label", "movie_name"]), "movie_name"


class Classification(Task):
    kind = "classification"
    Config = ClassificationConfig
    head_names = ("classifier", "score")
    primary_metric = "accuracy"

    def __init__(self, cfg: ClassificationConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.labels: list[str] | None = cfg.labels or BUILTIN_LABELS.get(cfg.data.source or "")

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def raw_splits(self) -> dict:
        if self._raw is None:
            self._raw = load_splits(self.cfg.data, builtin_loader=rotten_tomatoes)
            if self.labels is None:
                values = {str(v) for v in self._raw["train"][self.cfg.label_column]} if (
                    self.cfg.label_column in self._raw["train"].column_names) else set()
                ints = all(v.lstrip("-").isdigit() for v in values)
                self.labels = sorted(values, key=int) if ints and values else sorted(values)
        return self._raw

    def model_kwargs(self):
        if self.labels is None:  # known labels: a model can be rebuilt without its data
            self.raw_splits()
        return dict(
            num_labels=len(self.labels),
            id2label=dict(enumerate(self.labels)),
            label2id={n: i for i, n in enumerate(self.labels)},
        )

    def datasets(self) -> dict:
        c = self.cfg
        raw = self.raw_splits()
        label2id = {n: i for i, n in enumerate(self.labels)}
        cols = [c.text_column, c.label_column] + ([c.text_pair_column] if c.text_pair_column else [])
        out = {}
        for split, ds in raw.items():
            where = f"task.data.{split}" + (f" ({c.data.path(split)})" if c.data.path(split) else "")
            require_columns(ds, cols, where)
            ids = []
            for row, v in enumerate(ds[c.label_column]):
                if str(v) not in label2id:
                    raise DataError(f"{where}: row {row + 1}: label {v!r} not in the label set {self.labels}")
                ids.append(label2id[str(v)])
            texts = [("" if t is None else str(t)) for t in ds[c.text_column]]
            pairs = [("" if t is None else str(t)) for t in ds[c.text_pair_column]] if c.text_pair_column else None
            enc = self.tokenizer(texts, pairs, truncation=True, max_length=c.max_length)
            # Only rows cut to exactly max_length can have been truncated: re-tokenize just those.
            cut = [i for i, x in enumerate(enc["input_ids"]) if len(x) == c.max_length]
            if cut:
                full = self.tokenizer([texts[i] for i in cut], [pairs[i] for i in cut] if pairs else None)["input_ids"]
                self.truncated += sum(len(f) > c.max_length for f in full)
            enc["labels"] = ids
            enc["length"] = [len(x) for x in enc["input_ids"]]
            import datasets

            out[split] = datasets.Dataset.from_dict(dict(enc))
        return out

    def collate(self, features):
        labels = torch.tensor([f["labels"] for f in features])
        inputs = [{k: v for k, v in f.items() if k not in ("labels", "length")} for f in features]
        batch = self.tokenizer.pad(inputs, return_tensors="pt")
        batch["labels"] = labels
        return dict(batch)

    @torch.no_grad()
    def eval_step(self, model, batch):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return out.logits.argmax(-1).tolist(), batch["labels"].tolist()

    def metrics(self, preds, refs):
        from sklearn.metrics import accuracy_score, f1_score

        return {
            "accuracy": float(accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, average="macro", labels=list(range(len(self.labels))), zero_division=0)),
        }

    def info(self):
        return {"labels": self.labels, "truncated_examples": self.truncated, "max_length": self.cfg.max_length}
