"""Sequence classification (one text or a text pair -> one label); accuracy and macro-F1."""

from __future__ import annotations

import json
from typing import Literal

import torch

from peftkit.assets import locate
from peftkit.errors import DataError, UserError
from peftkit.tasks.base import DataConfig, Task, TaskConfig, cell_text, to_device
from peftkit.tasks.data import columns

BUILTIN_LABELS = {"builtin:rotten-tomatoes": ["rotten", "fresh"]}


class ClassificationConfig(TaskConfig):
    kind: Literal["classification"] = "classification"
    data: DataConfig = DataConfig(source="builtin:rotten-tomatoes")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = None  # label names in id order; None = inferred from train
    # The backbone's pooler (BERT: CLS -> pooler.dense -> tanh; DistilBERT: pre_classifier) is part
    # of the task head: trainable in every strategy. Sentence-embedding checkpoints (all-MiniLM)
    # were trained with mean pooling, so their pooler was never tuned; frozen it costs accuracy.
    train_pooler: bool = True


def rotten_tomatoes(name: str):
    """Critic snippets labelled fresh/rotten; duplicate texts dropped; grouped by film."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("csv", data_files=str(locate(name)), split="train", keep_default_na=False)
    seen: set[str] = set()
    keep = []
    cols = columns(ds, ["category", "text"])
    for i, (cat, text) in enumerate(zip(cols["category"], cols["text"])):
        if cat in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            keep.append(i)
    ds = ds.select(keep).rename_column("category", "label")
    return ds.select_columns(["text", "label", "movie_name"]), "movie_name"


class Classification(Task):
    kind = "classification"
    Config = ClassificationConfig
    auto_class_name = "AutoModelForSequenceClassification"
    pipeline_tag = "text-classification"
    # Predictions are {"label", "score"}: the CLI echoes the input as "text".
    model_classes = ("ForSequenceClassification",)
    echo_key = "text"
    # Module names of the head (the pooler included: kept out of quantization too).
    head_names = ("classifier", "score", "pooler", "pooler.dense", "pre_classifier")
    pooler_names = ("pooler", "pre_classifier")
    primary_metric = "accuracy"
    labelled = True

    def __init__(self, cfg: ClassificationConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.labels = self.labels or BUILTIN_LABELS.get(cfg.data.source or "")

    def head(self, model) -> list[str]:
        head = [n for n in ("classifier", "score") if hasattr(model, n)]
        if self.cfg.train_pooler:
            # The Linear itself (BERT: pooler.dense): peft's IA3 unload cannot replace a wrapped BertPooler.
            head += [f"{n}.dense" if isinstance(getattr(m, "dense", None), torch.nn.Linear) else n
                     for n, m in model.named_modules()
                     if n.rsplit(".", 1)[-1] in self.pooler_names and any(True for _ in m.parameters())]
        self.head_modules = head
        return head

    def load_builtin(self, name: str):
        return rotten_tomatoes(name)

    def text_columns(self) -> list[str]:
        return [self.cfg.text_column] + ([self.cfg.text_pair_column] if self.cfg.text_pair_column else [])

    def columns(self) -> list[str]:
        return self.text_columns() + [self.cfg.label_column]

    def bad_row(self, row: dict) -> str | None:
        return next((f"empty '{k}'" for k in self.columns() if row[k] is None or not str(row[k]).strip()), None)

    def infer_labels(self, raw: dict) -> list[str]:
        values = {str(v) for v in raw["train"][self.cfg.label_column]}
        ints = all(v.lstrip("-").isdigit() for v in values)
        return sorted(values, key=int) if ints and values else sorted(values)

    def encode_split(self, split: str, ds):
        import datasets

        c = self.cfg
        label2id = {n: i for i, n in enumerate(self.labels)}
        ids = []
        cols = columns(ds, [c.label_column, c.text_column, *([c.text_pair_column] if c.text_pair_column else [])])
        for row, v in enumerate(cols[c.label_column]):
            if str(v) not in label2id:
                raise DataError(f"{self.where(split)}: row {row + 1}: label {v!r} not in the label set {self.labels}")
            ids.append(label2id[str(v)])
        texts = [cell_text(t) for t in cols[c.text_column]]
        pairs = [cell_text(t) for t in cols[c.text_pair_column]] if c.text_pair_column else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=c.max_length)
        # Only rows cut to exactly max_length can have been truncated: re-tokenize just those.
        cut = [i for i, x in enumerate(enc["input_ids"]) if len(x) == c.max_length]
        if cut:
            full = self.tokenizer([texts[i] for i in cut], [pairs[i] for i in cut] if pairs else None)["input_ids"]
            self.truncated += sum(len(f) > c.max_length for f in full)
        enc["labels"] = ids
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return datasets.Dataset.from_dict(dict(enc))

    def collate(self, features):
        labels = torch.tensor([f["labels"] for f in features])
        inputs = [{k: v for k, v in f.items() if k not in ("labels", "length")} for f in features]
        batch = self.tokenizer.pad(inputs, return_tensors="pt")
        batch["labels"] = labels
        return dict(batch)

    @torch.no_grad()
    def eval_step(self, model, batch):
        return self.eval_outputs(model, batch)[:2]

    def eval_outputs(self, model, batch):
        import torch.nn.functional as F

        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return logits.argmax(-1).tolist(), batch["labels"].tolist(), loss.tolist()

    def metrics(self, preds, refs):
        from sklearn.metrics import accuracy_score, f1_score

        return {
            "accuracy": float(accuracy_score(refs, preds)),
            "macro_f1": float(f1_score(refs, preds, average="macro", labels=list(range(len(self.labels))), zero_division=0)),
        }

    # -- prediction ---------------------------------------------------------------------
    def predict_input(self, x) -> tuple[str, str | None]:
        """(text, pair) of one input: a text, [text, pair], or an object of the text column(s)."""
        cols = self.text_columns()
        if isinstance(x, dict):
            missing = [k for k in cols if k not in x]
            if missing:
                raise UserError(f"predict: input {json.dumps(x)[:80]} lacks column(s) {', '.join(missing)}")
            return cell_text(x[cols[0]]), (cell_text(x[cols[1]]) if len(cols) == 2 else None)
        if len(cols) == 1 and isinstance(x, str):
            return x, None
        if len(cols) == 2 and isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(t, str) for t in x):
            return x[0], x[1]
        want = "a text" if len(cols) == 1 else f"a pair [{cols[0]}, {cols[1]}]"
        raise UserError(f"predict: classification takes {want} or an object of its column(s) "
                        f"({', '.join(cols)}), not {type(x).__name__}")

    @torch.no_grad()
    def predict(self, model, inputs, batch_size, max_length=None):
        id2label = model.config.id2label
        rows = [self.predict_input(x) for x in inputs]
        out = []
        for k in range(0, len(rows), batch_size):
            texts, pairs = zip(*rows[k : k + batch_size])
            enc = self.tokenizer(list(texts), list(pairs) if self.cfg.text_pair_column else None, padding=True,
                                 truncation=True, max_length=max_length, return_tensors="pt")
            probs = model(**to_device(model, enc)).logits.float().softmax(-1)
            score, idx = probs.max(-1)
            out += [{"label": id2label[int(i)], "score": float(s)} for s, i in zip(score, idx)]
        return out

    def info(self):
        return {**super().info(), "head_modules": getattr(self, "head_modules", None),
                "train_pooler": self.cfg.train_pooler}
