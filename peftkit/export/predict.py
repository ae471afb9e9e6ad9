"""Predictions from an exported directory (plain transformers) or a run directory.

    Predictor.load("merged/").predict(["a fine film"])  ->  [{"label": "fresh", "score": 0.93}]

A directory with ``recipe.yaml`` (a run, or an ``--adapter-only`` / non-mergeable export)
is rebuilt by peftkit; any other directory with a ``config.json`` is loaded with
transformers alone, its task kind taken from ``peftkit.json`` (with the task's settings:
prompt template, chat template, lengths) or else from the model class. The task's own
``predict`` (``peftkit/tasks/<kind>.py``) does the work; each input is a text, or:

* classification with ``text_pair_column``: ``[text, pair]`` or an object of both columns
  -> ``{"label", "score"}``;
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

from pathlib import Path

from peftkit import tasks
from peftkit.errors import UserError
from peftkit.io import read_json
from peftkit.training.rundir import EXPORT_JSON, RECIPE, check_weights, load_trained
from peftkit.tasks.generation import GenerationTask


def kind_by_class() -> dict[str, str]:
    """transformers model class suffix -> task kind (each kind's ``model_classes``, subject to its
    ``claims(config)``), for directories peftkit did not write; the first registered kind has a suffix."""
    out: dict[str, str] = {}
    for kind, cls in tasks.REGISTRY.items():
        for suffix in cls.model_classes:
            out.setdefault(suffix, kind)
    return out


class Predictor:
    def __init__(self, model, tokenizer, kind: str, max_length: int | None = None, task: tasks.Task | None = None):
        _supported(kind)
        self.model, self.tokenizer, self.kind, self.max_length = model.eval(), tokenizer, kind, max_length
        # The task as trained (prompt building, generation settings); defaults when unknown.
        self.task = task or tasks.get(tasks.REGISTRY[kind].Config(), tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Predictor:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"{p}: model directory not found")
        if (p / RECIPE).is_file():
            b = load_trained(p)
            kind, max_length = b.recipe.task.kind, getattr(b.recipe.task, "max_length", None)
            return cls(_to(b.model, device), b.tokenizer, kind, max_length, b.task)
        if not (p / "config.json").is_file():
            raise UserError(f"{p}: neither an exported model (config.json) nor a peftkit run (recipe.yaml)")
        import transformers

        meta = read_json(p / EXPORT_JSON) if (p / EXPORT_JSON).is_file() else {}
        for name in meta.get("sha256") or {}:  # the weights as exported, before transformers loads them
            check_weights(p, name)
        config = transformers.AutoConfig.from_pretrained(p)
        arch = (config.architectures or [""])[0]
        by_class = kind_by_class()
        kind = meta.get("task") or next((k for s, k in by_class.items()
                                         if arch.endswith(s) and tasks.REGISTRY[k].claims(config)), None)
        if kind is None or not hasattr(transformers, arch):
            raise UserError(f"{p}: cannot tell the task of model class '{arch}' (known: {', '.join(by_class)})")
        model = getattr(transformers, arch).from_pretrained(p, dtype="auto")
        tokenizer = transformers.AutoTokenizer.from_pretrained(p)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as backbone.load_tokenizer: decoders ship without one
        _supported(kind)
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
            if not isinstance(self.task, GenerationTask) or max_new_tokens < 1:
                raise UserError(f"predict: max_new_tokens applies to causal_lm and seq2seq and must be >= 1 "
                                f"(task {self.kind}, got {max_new_tokens})")
            opts["max_new_tokens"] = max_new_tokens
        return self.task.predict(self.model, list(inputs), batch_size, self.max_length, **opts)


def _supported(kind: str) -> None:
    if kind not in tasks.REGISTRY:
        raise UserError(f"predict: task kind '{kind}' is not supported (supported: {', '.join(tasks.REGISTRY)})")


def _to(model, device):
    # A 4-bit model is placed at load time (device_map); only plain models move.
    if device is None or getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_4bit", False):
        return model
    return model.to(device)
