"""What causal-LM and seq2seq fine-tuning share: prompts from a template, references,
greedy generation and the metrics that fit the answers.

A row becomes ``prompt`` (the template ``task.prompt`` filled with the row's columns; a
list value is joined with spaces) and references (``task.response_column``: a string, or
a list whose first item is the training target and all items are references).

Metrics (``task.metric``): ``accuracy`` = exact match after lower-casing and stripping
punctuation/space, against any reference (label-like answers); ``rouge`` = ROUGE-1/2/L
F-measure (rouge-score, stemmed; the best over the references), 0..1; ``bleu`` = BLEU and
chrF (sacrebleu, multi-reference), 0..100 as sacrebleu reports them. Always: ``eval_loss``
(mean cross-entropy per target token, teacher-forced on the first reference) and
``perplexity`` = exp(eval_loss).
"""

from __future__ import annotations

import json
import math
import re
import string
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from peftkit import arch
from peftkit.errors import DataError, UserError
from peftkit.tasks.base import Task, TaskConfig, cell_text, to_device
from peftkit.tasks.data import columns

PRIMARY = {"accuracy": "accuracy", "rouge": "rougeL", "bleu": "bleu"}


class GenerationConfig(TaskConfig):
    prompt: str = "{prompt}"  # template: {column} placeholders filled from each row
    response_column: str = "response"
    metric: Literal["accuracy", "rouge", "bleu"] = "rouge"
    max_length: int = Field(512, ge=16)  # prompt + target tokens
    max_target_length: int = Field(128, ge=1)  # target tokens kept for training/loss
    max_new_tokens: int = Field(64, ge=1)  # greedy generation at evaluation

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid template ({e}); use {{column}} placeholders, "
                             "{{ and }} for literal braces") from None
        if any(not f or not f.isidentifier() for f in fields):
            raise ValueError("placeholders must be column names, e.g. {text}")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.max_target_length > self.max_length - 8:
            raise ValueError(f"task.max_target_length ({self.max_target_length}) must leave room for the prompt "
                             f"in task.max_length ({self.max_length})")
        return self


def placeholders(template: str) -> list[str]:
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


def references(v) -> list[str]:
    """A response cell (a string, or a list of references) as its non-empty, stripped references."""
    rs = [cell_text(x) for x in v] if isinstance(v, (list, tuple)) else [cell_text(v)]
    return [r.strip() for r in rs if r.strip()]


def builtin_rows(name: str):
    from peftkit.tasks.classification import rotten_tomatoes

    if name == "builtin:rotten-tomatoes":
        return rotten_tomatoes(name)
    raise DataError(f"task.data.source: builtin '{name}' is not available for this task")


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def text_metrics(metric: str, hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    if metric == "accuracy":
        hits = [any(normalize(h) == normalize(r) for r in rs) for h, rs in zip(hyps, refs)]
        return {"accuracy": sum(hits) / max(1, len(hits))}
    if metric == "rouge":
        from rouge_score import rouge_scorer

        sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        tot = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for h, rs in zip(hyps, refs):
            s = sc.score_multi(rs, h)  # the best reference per measure
            for k in tot:
                tot[k] += s[k].fmeasure
        return {k: v / max(1, len(hyps)) for k, v in tot.items()}
    import sacrebleu

    n = max(len(rs) for rs in refs)
    # sacrebleu wants one stream per reference slot; None marks a missing reference.
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(n)]
    return {"bleu": float(sacrebleu.corpus_bleu(hyps, streams).score),
            "chrf": float(sacrebleu.corpus_chrf(hyps, streams).score)}


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Summed cross-entropy and target-token count per row; logits [B, T, V] aligned to labels [B, T]."""
    loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                             reduction="none")  # [B, T]
    return loss.sum(1).tolist(), (labels != -100).sum(1).tolist()


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([[value] * (n - len(s)) + s if left else s + [value] * (n - len(s)) for s in seqs])


def unwrap(model):
    """The module that has .generate (under DDP the wrapper hides it)."""
    return getattr(model, "module", model)


class GenerationTask(Task):
    """Shared data, references, generation and metrics; subclasses encode and generate."""

    head_names = ()
    model_kind: ClassVar[str]  # the peftkit.arch kind of backbone this task trains

    @classmethod
    def check(cls, recipe) -> list[str]:
        problems = super().check(recipe)
        found = arch.kind_of(recipe.model.name)
        if found is not None and found != cls.model_kind:
            problems.append(f"task '{cls.kind}' needs a {cls.model_kind} model, but model.name={recipe.model.name} "
                            f"is {'an' if found == 'encoder' else 'a'} {found} ({arch.model_type_of(recipe.model.name)})")
        return problems

    def __init__(self, cfg: GenerationConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.primary_metric = PRIMARY[cfg.metric]
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if self.eos_id is None:
            raise DataError("model.name: the tokenizer has no eos (or sep) token to end a response with")

    def load_builtin(self, name: str):
        return builtin_rows(name)

    def columns(self) -> list[str]:
        return placeholders(self.cfg.prompt) + [self.cfg.response_column]

    def bad_row(self, row: dict) -> str | None:
        return None if references(row[self.cfg.response_column]) else f"empty '{self.cfg.response_column}'"

    def rows(self) -> dict[str, tuple[list[str], list[list[str]]]]:
        """Per split: prompts and references (the first reference is the training target)."""
        return {split: self.prompts_refs(ds) for split, ds in self.raw_splits().items()}

    def prompts_refs(self, ds) -> tuple[list[str], list[list[str]]]:
        cols = placeholders(self.cfg.prompt)
        values = columns(ds, {*cols, self.cfg.response_column})
        prompts = [self.prompt_text({k: values[k][i] for k in cols}) for i in range(len(ds))]
        return prompts, [references(v) for v in values[self.cfg.response_column]]

    def encode_split(self, split: str, ds):
        import datasets

        return datasets.Dataset.from_dict(self.encode_rows(split, *self.prompts_refs(ds)))

    def encode_rows(self, split: str, prompts: list[str], refs: list[list[str]]) -> dict[str, list]:
        """Columns of one tokenized split (adds to ``self.truncated``)."""
        raise NotImplementedError

    def prompt_text(self, row: dict) -> str:
        """The template filled with a row's columns (a list value joined with spaces)."""
        return self.cfg.prompt.format_map({k: cell_text(row[k]) for k in placeholders(self.cfg.prompt)})

    def target_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.cfg.max_target_length - 1]
        return ids + [self.eos_id]

    def generation_config(self, model, **extra):
        from transformers import GenerationConfig as GC

        return GC(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, num_beams=1,
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id, **extra)

    def prompt_batch(self, prompts: list[str]) -> dict:
        """input_ids/attention_mask for ``generate``, built as in evaluation (used by predict)."""
        raise NotImplementedError

    def generate(self, model, input_ids, attention_mask) -> list[str]:
        """Greedy, ``max_new_tokens`` at most: the generated texts only."""
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def metrics(self, preds, refs):
        m = text_metrics(self.cfg.metric, [p["text"] for p in preds], refs)
        nll, tokens = sum(p["nll"] for p in preds), sum(p["tokens"] for p in preds)
        m["eval_loss"] = nll / tokens if tokens else float("nan")
        m["perplexity"] = math.exp(min(m["eval_loss"], 50.0)) if tokens else float("nan")
        m["generated_words_mean"] = sum(len(p["text"].split()) for p in preds) / max(1, len(preds))
        return m

    # -- prediction ---------------------------------------------------------------------
    def predict_prompt(self, x) -> str:
        """One input (a text for a one-placeholder template, or an object of its columns) as a prompt."""
        cols = placeholders(self.cfg.prompt)
        if isinstance(x, str):
            if len(cols) != 1:
                raise UserError(f"predict: the prompt template {self.cfg.prompt!r} has {len(cols)} placeholders; "
                                "give each input as a JSON object of its columns (--json-input)")
            x = {cols[0]: x}
        if not isinstance(x, dict):
            raise UserError(f"predict: {self.kind} takes a text or an object of the template's columns, "
                            f"not {type(x).__name__}")
        missing = [c for c in cols if c not in x]
        if missing:
            raise UserError(f"predict: input {json.dumps(x)[:80]} lacks column(s) {', '.join(missing)} "
                            f"of the prompt template {self.cfg.prompt!r}")
        return self.prompt_text(x)

    @torch.no_grad()
    def predict(self, model, inputs, batch_size, max_length=None, max_new_tokens: int | None = None):
        """Greedy continuations, the prompts built exactly as evaluation builds them."""
        task = self
        if max_new_tokens is not None:
            task = type(self)(self.cfg.model_copy(update={"max_new_tokens": max_new_tokens}), self.tokenizer)
        prompts = [task.predict_prompt(x) for x in inputs]
        out = []
        for k in range(0, len(prompts), batch_size):
            batch = to_device(model, task.prompt_batch(prompts[k : k + batch_size]))
            out += [{"text": t} for t in task.generate(model, **batch)]
        return out

    def info(self):
        c = self.cfg
        return {"metric": c.metric, "primary_metric": self.primary_metric, "prompt": c.prompt,
                "max_new_tokens": c.max_new_tokens, **super().info()}
