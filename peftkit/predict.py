"""Predictions from an exported directory (plain transformers) or a run directory.

    Predictor.load("merged/").predict(["a fine film"])  ->  [{"label": "fresh", "score": 0.93}]

A directory with ``recipe.yaml`` (a run, or an ``--adapter-only`` / non-mergeable export)
is rebuilt by peftkit; any other directory with a ``config.json`` is loaded with
transformers alone, its task kind taken from ``peftkit.json`` (with the task's settings:
prompt template, chat template, lengths) or else from the model class. One function per
task kind in ``PREDICT``; each input is a text, or:

* token_classification: a list of words (a text is split on whitespace) ->
  ``{"words", "tags", "entities": [{"type", "words", "start", "end", "score"}]}``, entities
  grouped from the BIO tags by seqeval, ``end`` exclusive, ``score`` the mean probability of
  the entity's word tags; words cut off by ``max_length`` are tagged ``O`` (as in evaluation)
  and counted in ``truncated_words``;
* causal_lm / seq2seq: a dict of the prompt template's columns (a text fills a template with
  one placeholder) -> ``{"text": greedy continuation of max_new_tokens at most}``, the prompt
  built by the task's own code (template, chat template, bos, truncation) as in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import tasks
from .errors import UserError

# transformers model class suffix -> task kind, for directories peftkit did not write.
KIND_BY_CLASS = {
    "ForSequenceClassification": "classification",
    "ForTokenClassification": "token_classification",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",  # GPT2LMHeadModel and kin
    "ForConditionalGeneration": "seq2seq",  # encoder-decoders only (checked on the config)
}


class Predictor:
    def __init__(self, model, tokenizer, kind: str, max_length: int | None = None, task: tasks.Task | None = None):
        if kind not in PREDICT:
            raise UserError(f"predict: task kind '{kind}' is not supported (supported: {', '.join(PREDICT)})")
        self.model, self.tokenizer, self.kind, self.max_length = model.eval(), tokenizer, kind, max_length
        # The task as trained (prompt building, generation settings); defaults when unknown.
        self.task = task or tasks.get(tasks.REGISTRY[kind].Config(), tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Predictor:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: model directory not found")
        if (p / "recipe.yaml").is_file():
            from .export import load_trained

            b = load_trained(p)
            kind, max_length = b.recipe.task.kind, getattr(b.recipe.task, "max_length", None)
            return cls(_to(b.model, device), b.tokenizer, kind, max_length, b.task)
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: neither an exported model (config.json) nor a peftkit run (recipe.yaml)")
        import transformers

        meta = json.loads((p / "peftkit.json").read_text(encoding="utf-8")) if (p / "peftkit.json").is_file() else {}
        config = transformers.AutoConfig.from_pretrained(p)
        arch = (config.architectures or [""])[0]
        kind = meta.get("task") or next((k for s, k in KIND_BY_CLASS.items() if arch.endswith(s)), None)
        if kind == "seq2seq" and not meta and not getattr(config, "is_encoder_decoder", False):
            kind = None  # e.g. a vision-language decoder named ...ForConditionalGeneration
        if kind is None or not hasattr(transformers, arch):
            raise UserError(f"{p}: cannot tell the task of model class '{arch}' (known: {', '.join(KIND_BY_CLASS)})")
        model = getattr(transformers, arch).from_pretrained(p, dtype="auto")
        tokenizer = transformers.AutoTokenizer.from_pretrained(p)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as backbone.load_tokenizer: decoders ship without one
        if kind not in PREDICT:
            raise UserError(f"predict: task kind '{kind}' is not supported (supported: {', '.join(PREDICT)})")
        try:
            cfg = tasks.REGISTRY[kind].Config.model_validate(meta.get("task_config") or {"kind": kind})
        except ValueError as e:
            raise UserError(f"{p / 'peftkit.json'}: task_config does not fit this peftkit ({e})") from None
        return cls(_to(model, device), tokenizer, kind, meta.get("max_length"), tasks.get(cfg, tokenizer))

    def predict(self, inputs: list, batch_size: int = 32, max_new_tokens: int | None = None) -> list[dict]:
        """``max_new_tokens`` (generation tasks) overrides the task's setting."""
        if isinstance(inputs, (str, dict)):
            inputs = [inputs]
        opts = {}
        if max_new_tokens is not None:
            if self.kind not in GENERATION or max_new_tokens < 1:
                raise UserError(f"predict: max_new_tokens applies to {' and '.join(GENERATION)} and must be >= 1 "
                                f"(task {self.kind}, got {max_new_tokens})")
            opts["max_new_tokens"] = max_new_tokens
        return PREDICT[self.kind](self, list(inputs), batch_size, **opts)

    def encode(self, texts: list[str]) -> dict:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self.to_device(enc)

    def to_device(self, batch: dict) -> dict:
        dev = next(self.model.parameters()).device
        return {k: v.to(dev) for k, v in batch.items()}


def _to(model, device):
    # A 4-bit model is placed at load time (device_map); only plain models move.
    if device is None or getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)


def _batches(items: list, n: int):
    for k in range(0, len(items), n):
        yield items[k : k + n]


@torch.no_grad()
def classify(pred: Predictor, texts: list[str], batch_size: int) -> list[dict]:
    id2label = pred.model.config.id2label
    out = []
    for chunk in _batches(texts, batch_size):
        probs = pred.model(**pred.encode(chunk)).logits.float().softmax(-1)
        score, idx = probs.max(-1)
        out += [{"label": id2label[int(i)], "score": float(s)} for s, i in zip(score, idx)]
    return out


def _words(x) -> list[str]:
    if isinstance(x, str):
        return x.split()
    if isinstance(x, (list, tuple)) and all(isinstance(w, str) for w in x):
        return list(x)
    raise UserError(f"predict: token_classification takes a text or a list of words, not {type(x).__name__}")


@torch.no_grad()
def tag(pred: Predictor, inputs: list, batch_size: int) -> list[dict]:
    from seqeval.metrics.sequence_labeling import get_entities

    from .tasks.token_classification import first_subwords

    id2label = pred.model.config.id2label
    out = []
    for chunk in _batches([_words(x) for x in inputs], batch_size):
        # An empty input still gets a row (special tokens only) so rows and inputs stay aligned.
        enc = pred.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=pred.max_length,
                             padding=True, return_tensors="pt")
        probs = pred.model(**pred.to_device(dict(enc))).logits.float().softmax(-1)  # [B, T, labels]
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


def _prompt(task, x) -> str:
    from .tasks.generation import placeholders

    cols = placeholders(task.cfg.prompt)
    if isinstance(x, str):
        if len(cols) != 1:
            raise UserError(f"predict: the prompt template {task.cfg.prompt!r} has {len(cols)} placeholders; "
                            "give each input as a JSON object of its columns (--json-input)")
        x = {cols[0]: x}
    if not isinstance(x, dict):
        raise UserError(f"predict: {task.kind} takes a text or an object of the template's columns, "
                        f"not {type(x).__name__}")
    missing = [c for c in cols if c not in x]
    if missing:
        raise UserError(f"predict: input {json.dumps(x)[:80]} lacks column(s) {', '.join(missing)} "
                        f"of the prompt template {task.cfg.prompt!r}")
    return task.prompt_text(x)


@torch.no_grad()
def generate(pred: Predictor, inputs: list, batch_size: int, max_new_tokens: int | None = None) -> list[dict]:
    task = pred.task
    if max_new_tokens is not None:
        task = tasks.get(task.cfg.model_copy(update={"max_new_tokens": max_new_tokens}), pred.tokenizer)
    out = []
    for chunk in _batches([_prompt(task, x) for x in inputs], batch_size):
        batch = pred.to_device(task.prompt_batch(chunk))  # the prompts exactly as evaluation builds them
        out += [{"text": t} for t in task.generate(pred.model, **batch)]
    return out


GENERATION = ("causal_lm", "seq2seq")
PREDICT = {"classification": classify, "token_classification": tag, "causal_lm": generate, "seq2seq": generate}
