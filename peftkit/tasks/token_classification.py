"""Token classification (NER, BIO tags); entity-level precision/recall/F1 with seqeval.

Data: CoNLL text (token<TAB>tag, blank line between sentences) or JSONL/JSON/parquet rows
with a list of tokens and a list of tags. Each word's tag goes to its first sub-word; the
other sub-words get -100 (no loss, no prediction). Words cut off by ``max_length`` count
as predicted ``O`` in the metrics, so truncation costs recall instead of hiding it.
"""

from __future__ import annotations

from typing import Literal

import torch

from peftkit.errors import DataError, UserError
from peftkit.tasks.base import Task, TaskConfig, to_device
from peftkit.tasks.data import columns


class TokenClassificationConfig(TaskConfig):
    kind: Literal["token_classification"] = "token_classification"
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    labels: list[str] | None = None  # tag names in id order; None = the tags of all splits, sorted ("O" first)


def _sort_tags(tags: set[str]) -> list[str]:
    # O first, then by entity type, B before I: a stable, readable id order.
    return sorted(tags, key=lambda t: (t != "O", t[2:] if t[1:2] == "-" else t, t))


def first_subwords(word_ids: list[int | None]) -> list[tuple[int, int]]:
    """(token position, word index) of each word's first sub-word: the one that carries its tag."""
    out, prev = [], None
    for j, w in enumerate(word_ids):
        if w is not None and w != prev:
            out.append((j, w))
        prev = w
    return out


class TokenClassification(Task):
    kind = "token_classification"
    Config = TokenClassificationConfig
    auto_class_name = "AutoModelForTokenClassification"
    pipeline_tag = "token-classification"
    model_classes = ("ForTokenClassification",)
    echo_key = "input"
    head_names = ("classifier", "score")
    primary_metric = "f1"
    labelled = True

    @classmethod
    def check(cls, recipe) -> list[str]:
        if getattr(recipe.train, "padding_free", False):
            return ["train.padding_free is for causal_lm tasks (an encoder would attend across the joined sentences)"]
        return []

    def columns(self) -> list[str]:
        return [self.cfg.tokens_column, self.cfg.tags_column]

    def infer_labels(self, raw: dict) -> list[str]:
        # All splits: a tag missing from a (sub-sampled) train split is still a class.
        return _sort_tags({t for ds in raw.values() for row in columns(ds, [self.cfg.tags_column])[self.cfg.tags_column]
                           for t in row})

    def _rows(self, split: str, ds) -> tuple[list[list[str]], list[list[int]]]:
        c, where = self.cfg, self.where(split)
        label2id = {n: i for i, n in enumerate(self.labels)}
        words, tag_ids = [], []
        cols = columns(ds, [c.tokens_column, c.tags_column])
        for row, (toks, tags) in enumerate(zip(cols[c.tokens_column], cols[c.tags_column])):
            if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags):
                raise DataError(f"{where}: row {row + 1}: '{c.tokens_column}' and '{c.tags_column}' "
                                "must be lists of the same length")
            unknown = [t for t in tags if t not in label2id]
            if unknown:
                raise DataError(f"{where}: row {row + 1}: tag {unknown[0]!r} not in the tag set {self.labels}")
            words.append([str(w) for w in toks])
            tag_ids.append([label2id[t] for t in tags])
        return words, tag_ids

    def encode_split(self, split: str, ds):
        import datasets

        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError("token_classification needs a fast tokenizer (word_ids() aligns tags to sub-words)")
        words, tag_ids = self._rows(split, ds)
        enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.cfg.max_length)
        labels, tails = [], []
        for i, tags in enumerate(tag_ids):
            lab = [-100] * len(enc["input_ids"][i])
            firsts = first_subwords(enc.word_ids(i))
            for j, w in firsts:
                lab[j] = tags[w]
            seen = firsts[-1][1] + 1 if firsts else 0
            tails.append(tags[seen:])  # words lost to truncation
            self.truncated += seen < len(tags)
            labels.append(lab)
        cols = dict(enc)
        cols["labels"] = labels
        cols["length"] = [len(x) for x in enc["input_ids"]]
        if split != "train":
            cols["tail"] = tails
        return datasets.Dataset.from_dict(cols)

    def collate(self, features):
        from transformers import DataCollatorForTokenClassification

        tails = [f["tail"] for f in features] if "tail" in features[0] else None
        inputs = [{k: v for k, v in f.items() if k not in ("length", "tail")} for f in features]
        batch = dict(DataCollatorForTokenClassification(self.tokenizer, return_tensors="pt")(inputs))
        if tails is not None:
            batch["tail"] = tails
        return batch

    @torch.no_grad()
    def eval_step(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "tail")}
        pred = model(**inputs).logits.argmax(-1).tolist()
        labels = batch["labels"].tolist()
        tails = batch.get("tail") or [[] for _ in labels]  # one (empty) tail per example
        preds, refs = [], []
        for i, (lab, tail) in enumerate(zip(labels, tails)):
            keep = [j for j, y in enumerate(lab) if y != -100]
            preds.append([self.labels[pred[i][j]] for j in keep] + ["O"] * len(tail))
            refs.append([self.labels[lab[j]] for j in keep] + [self.labels[t] for t in tail])
        return preds, refs

    def logit_mask(self, batch):
        return batch["attention_mask"].bool()  # every real token, not only the tagged first sub-words

    def metrics(self, preds, refs):
        from seqeval.metrics import accuracy_score, classification_report

        rep = classification_report(refs, preds, output_dict=True, zero_division=0)
        micro = rep.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
        m = {"precision": float(micro["precision"]), "recall": float(micro["recall"]),
             "f1": float(micro["f1-score"]), "token_accuracy": float(accuracy_score(refs, preds))}
        if "macro avg" in rep:
            m["macro_f1"] = float(rep["macro avg"]["f1-score"])
        for typ, r in rep.items():
            if not typ.endswith(" avg"):
                m.update({f"{typ}_precision": float(r["precision"]), f"{typ}_recall": float(r["recall"]),
                          f"{typ}_f1": float(r["f1-score"])})
        return m

    @torch.no_grad()
    def predict(self, model, inputs, batch_size, max_length=None):
        from seqeval.metrics.sequence_labeling import get_entities

        id2label = model.config.id2label
        words_of = [_words(x) for x in inputs]
        out = []
        for k in range(0, len(words_of), batch_size):
            chunk = words_of[k : k + batch_size]
            # An empty input still gets a row (special tokens only) so rows and inputs stay aligned.
            enc = self.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt")
            probs = model(**to_device(model, enc)).logits.float().softmax(-1)  # [B, T, labels]
            score, idx = (t.tolist() for t in probs.max(-1))
            for i, words in enumerate(chunk):
                tags, scores = ["O"] * len(words), [0.0] * len(words)
                firsts = first_subwords(enc.word_ids(i))
                for j, w in firsts:
                    tags[w], scores[w] = id2label[idx[i][j]], score[i][j]
                ents = [{"type": typ, "words": words[a : b + 1], "start": a, "end": b + 1,
                         "score": sum(scores[a : b + 1]) / (b + 1 - a)} for typ, a, b in get_entities(tags)]
                row = {"words": words, "tags": tags, "entities": ents}
                seen = firsts[-1][1] + 1 if firsts else 0
                if seen < len(words):
                    row["truncated_words"] = len(words) - seen
                out.append(row)
        return out


def _words(x) -> list[str]:
    if isinstance(x, str):
        return x.split()
    if isinstance(x, (list, tuple)) and all(isinstance(w, str) for w in x):
        return list(x)
    raise UserError(f"predict: token_classification takes a text or a list of words, not {type(x).__name__}")
