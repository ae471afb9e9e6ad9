"""The task contract shared by every task kind.

A task knows its data, its collator, its head and its metric; it never looks at strategies.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from peftkit.config import Section
from peftkit.errors import DataError
from peftkit.tasks.data import BadRows, DataConfig, columns, load_splits


class TaskConfig(Section):
    kind: str
    data: DataConfig = DataConfig()
    max_length: int = Field(128, ge=8)


class Task:
    """Subclasses set ``kind`` and ``Config`` and implement the methods that raise here.

    The base reads the raw splits once (``raw_splits``: files, a builtin or a hub name, bad
    rows handled by ``task.data.bad_rows``), rebuilds tokenized splits on each ``datasets()``
    call (truncation counted per build, not accumulated; only once with ``keep_encoded``), and
    gives labelled kinds their head size (``model_kwargs``) and ``info``.
    """

    kind: ClassVar[str]
    Config: ClassVar[type[TaskConfig]]
    # Names of the task head modules on the model (new, always trainable).
    head_names: ClassVar[tuple[str, ...]] = ()
    primary_metric: ClassVar[str] = "loss"
    # Kinds with a label set (cfg.labels, else inferred from the data by ``infer_labels``).
    labelled: ClassVar[bool] = False
    # Declared by every kind (tasks/__init__.py refuses a registered kind without them):
    auto_class_name: ClassVar[str]  # the transformers Auto class of its model (backbone, model card)
    pipeline_tag: ClassVar[str]  # the Hub pipeline tag of its exports (model card)
    # Suffixes of transformers model class names whose exports are this kind: what ``predict`` goes by
    # for a directory without peftkit.json; () = only directories peftkit wrote.
    model_classes: ClassVar[tuple[str, ...]]
    echo_key: ClassVar[str]  # the key under which ``peftkit predict --json`` repeats each input

    def __init__(self, cfg: TaskConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.labels: list[str] | None = getattr(cfg, "labels", None)
        self.truncated = 0  # examples cut to max_length by the last datasets() call
        self.bad = BadRows(cfg.data.bad_rows)
        self._raw = None  # raw splits, read once
        self.keep_encoded = False  # True: datasets() tokenizes once and keeps the splits
        self._encoded = None

    @classmethod
    def check(cls, recipe) -> list[str]:
        return []

    @classmethod
    def claims(cls, config) -> bool:
        """Whether an exported model with this transformers ``config``, its class name matching
        ``model_classes``, is of this kind (``predict`` on a directory without peftkit.json)."""
        return True

    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    # -- data -----------------------------------------------------------------------------
    def where(self, split: str) -> str:
        p = self.cfg.data.path(split)
        return f"task.data.{split}" + (f" ({p})" if p else "")

    def load_builtin(self, name: str):
        """(Dataset, group column or None) of a ``builtin:NAME`` source."""
        raise DataError(f"task.data.source: builtin '{name}' is not available for this task")

    def columns(self) -> list[str]:
        """The columns every raw split must have."""
        return []

    def bad_row(self, row: dict) -> str | None:
        """Why a raw row (its ``columns()``) cannot be used (``task.data.bad_rows`` decides), None if it can."""
        return None

    def raw_splits(self) -> dict:
        if self._raw is None:
            self._raw = load_splits(self.cfg.data, builtin_loader=self.load_builtin, clean=self._clean,
                                    bad=self.bad)
            if self.labelled and self.labels is None:
                self.labels = self.infer_labels(self._raw)
        return self._raw

    def _clean(self, split: str, ds):
        require_columns(ds, self.columns(), self.where(split))
        if type(self).bad_row is Task.bad_row:
            return ds
        values = columns(ds, self.columns())
        keep = []
        for i in range(len(ds)):
            why = self.bad_row({k: v[i] for k, v in values.items()})
            if why is None:
                keep.append(i)
            else:
                self.bad.found(split, f"{self.where(split)}: row {i + 1}: {why}")
        return ds if len(keep) == len(ds) else ds.select(keep)

    def infer_labels(self, raw: dict) -> list[str]:
        raise NotImplementedError

    def datasets(self) -> dict:
        """Tokenized splits: {'train', 'validation', 'test'} -> datasets.Dataset."""
        if self._encoded is not None:
            return self._encoded
        raw = self.raw_splits()
        self.truncated = 0
        enc = {split: self.encode_split(split, ds) for split, ds in raw.items()}
        if self.keep_encoded:  # peftkit.model.build(shared=...): the next build of this task reuses them
            self._encoded = enc
        return enc

    def encode_split(self, split: str, ds):
        """One raw split tokenized (adds to ``self.truncated``)."""
        raise NotImplementedError

    # -- model ----------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Extra from_pretrained/from_config kwargs: the head size of a labelled kind."""
        if not self.labelled:
            return {}
        if self.labels is None:  # known labels: a model can be rebuilt without its data
            self.raw_splits()
        return dict(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                    label2id={n: i for i, n in enumerate(self.labels)})

    def head(self, model) -> list[str]:
        return [n for n in self.head_names if hasattr(model, n)]

    def collate(self, features: list[dict]) -> dict:
        raise NotImplementedError

    def train_loss(self, model, batch: dict):
        """The loss that training backpropagates (trainer and memory estimate alike)."""
        return model(**batch).loss

    def eval_step(self, model, batch) -> tuple[list, list]:
        """Predictions and references of one batch, as python lists."""
        raise NotImplementedError

    def eval_outputs(self, model, batch) -> tuple[list, list, list | None]:
        """``eval_step`` plus each example's loss where the kind has one (None): the trainer reports
        their mean as the ``loss`` metric (what a search ranks its rungs by)."""
        return (*self.eval_step(model, batch), None)

    def metrics(self, preds: list, refs: list) -> dict[str, float]:
        raise NotImplementedError

    def logit_mask(self, batch):
        """Bool [B, T]: the positions whose logits are predictions (``export --verify`` compares
        those); None when the model gives one row of logits per example."""
        return None

    def predict(self, model, inputs: list, batch_size: int, max_length: int | None = None) -> list[dict]:
        """One dict per input (see ``peftkit.export.predict``); ``max_length`` None = the tokenizer's limit."""
        raise NotImplementedError

    # -- what result.json records -----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Label names (labelled kinds), lengths, truncation and skipped rows."""
        out = {"labels": self.labels} if self.labelled else {}
        out.update(max_length=self.cfg.max_length, truncated_examples=self.truncated, bad_rows=self.bad.info())
        return out

    def notes(self) -> list[str]:
        """Warnings for the user about the data as last built (one line each)."""
        out = []
        if self.truncated:
            out.append(f"{self.truncated} example(s) longer than task.max_length={self.cfg.max_length} tokens "
                       "were truncated")
        if skipped := self.bad.note():
            out.append(skipped)
        return out


def cell_text(v) -> str:
    """A data cell as text: None is empty, a list is joined with spaces."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(cell_text(x) for x in v)
    return str(v)


def to_device(model, batch) -> dict:
    """A batch's tensors on the device of the model's first parameter."""
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in dict(batch).items()}


def require_columns(ds, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"columns present: {', '.join(ds.column_names)}"
        )
