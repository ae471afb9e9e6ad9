"""The data section of a task, and loading its splits from files (or a hub name, or a
builtin) through ``datasets``."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from peftkit.config import Section
from peftkit.errors import DataError
from peftkit.log import quiet_logger


class DataConfig(Section):
    source: str | None = None  # builtin:NAME, or a hub dataset name; None = use the files below
    dir: str | None = None  # files below are relative to this (override-able: task.data.dir=...)
    train: str | None = None
    validation: str | None = None
    test: str | None = None
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "conll"] = "auto"
    # Splits that have no file are cut from train by a seeded fraction.
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    split_seed: int = 0
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    # A row the task cannot use (a CoNLL line without a token, an empty text, label or
    # response): stop with its file and line (error), or drop it, counted in result.json (skip).
    bad_rows: Literal["error", "skip"] = "error"

    def path(self, split: str) -> Path | None:
        name = getattr(self, split)
        if name is None:
            return None
        p = Path(name)
        return Path(self.dir) / p if self.dir and not p.is_absolute() else p


class BadRows:
    """``task.data.bad_rows``: stop at the first bad row (error), or skip it, counted per split."""

    def __init__(self, policy: str):
        self.policy = policy
        self.skipped: dict[str, int] = {}
        self.first: str | None = None

    def found(self, split: str, what: str) -> None:
        """``what``: the file (or split) and line (or row) and what is wrong there."""
        if self.policy == "error":
            raise DataError(f"{what} (task.data.bad_rows: skip drops such rows)")
        self.skipped[split] = self.skipped.get(split, 0) + 1
        self.first = self.first or what

    def info(self) -> dict:
        return {"policy": self.policy, "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())}

    def note(self) -> str | None:
        if not self.skipped:
            return None
        per = ", ".join(f"{k} {v}" for k, v in self.skipped.items())
        return f"skipped {sum(self.skipped.values())} bad row(s) (task.data.bad_rows: skip): {per}; first: {self.first}"


_EXT = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
        ".conll": "conll", ".txt": "conll"}


def columns(ds, names) -> dict[str, list]:
    """Whole columns of ``ds`` as Python lists, in one Arrow conversion. (datasets >= 4:
    ``ds[name]`` is a lazy ``Column``; indexing it row by row costs ~50 µs a row, which made
    checking SST-2's 67k rows take 6 s of every run's start-up.)"""
    return ds.select_columns(list(dict.fromkeys(names))).with_format(None)[:]


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz")]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _EXT:
        raise DataError(f"{path}: cannot tell the file format from '{ext}'; set task.data.format")
    return _EXT[ext]


def read_conll(path: Path, on_bad=None):
    """CoNLL/BIO text -> Dataset(tokens, tags): first column = token, last column = tag.

    A sentence ends at a line that is empty after strip() (some files use a lone tab). A line
    without a token (``\tO``) goes to ``on_bad(message)`` (e.g. ``BadRows.found``), which
    raises or lets it be skipped; without ``on_bad`` it is an error.
    """
    import datasets

    tokens, tags, sent_tok, sent_tag = [], [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("-DOCSTART-"):
                if sent_tok:
                    tokens.append(sent_tok)
                    tags.append(sent_tag)
                    sent_tok, sent_tag = [], []
                continue
            parts = s.split("\t") if "\t" in s else s.split()
            if len(parts) < 2:
                msg = f"{path}: line {n}: expected 'token<TAB>tag', got {s[:60]!r}"
                if on_bad is None:
                    raise DataError(msg)
                on_bad(msg)
                continue
            sent_tok.append(parts[0].strip())
            sent_tag.append(parts[-1].strip())
    if sent_tok:
        tokens.append(sent_tok)
        tags.append(sent_tag)
    return datasets.Dataset.from_dict({"tokens": tokens, "tags": tags})


def load_file(path: Path, fmt: str, on_bad=None):
    """One file -> datasets.Dataset (``on_bad``: see ``read_conll``)."""
    import datasets

    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    fmt = file_format(path, fmt)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    kwargs: dict = {}
    if fmt in ("csv", "tsv"):
        builder = "csv"
        # keep_default_na=False: a text "NA" or "null" stays a string.
        kwargs = dict(keep_default_na=False)
        if fmt == "tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
    elif fmt in ("jsonl", "json"):
        builder = "json"
    elif fmt == "parquet":
        builder = "parquet"
    elif fmt == "conll":
        try:
            ds = read_conll(path, on_bad)
        except UnicodeDecodeError:
            raise DataError(bad_utf8(path)) from None
        if len(ds) == 0:
            raise DataError(f"{path}: no rows")
        return ds
    else:
        raise DataError(f"{path}: format '{fmt}' is not supported by this task")
    datasets.disable_progress_bars()
    try:
        # datasets logs a parse failure (and a blank line) before raising it: ours is the one line.
        with quiet_logger("datasets"):
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps parser errors in its own types
        raise DataError(parse_error(path, fmt, e)) from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


def parse_error(path: Path, fmt: str, e: Exception) -> str:
    """One line naming the file, line and column of what the parser refused.

    The parsers' own positions are not the file's: a UnicodeDecodeError's offset is within the
    chunk being decoded, pyarrow's JSON "row"/"position" counts from 0 within a block. The
    file is read again here (only after a failure) to find the line.
    """
    cause = e.__cause__ or e
    if isinstance(e, UnicodeDecodeError) or isinstance(cause, UnicodeDecodeError):
        return bad_utf8(path)
    if fmt in ("jsonl", "json") and (where := bad_json(path, fmt)):
        return where
    if fmt in ("csv", "tsv") and _header_only(path):
        return f"{path}: no rows (a header line only)"
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
    if m := re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg):  # pandas' C parser
        return (f"{path}: line {m[2]}: expected {m[1]} fields, saw {m[3]} "
                f"(quote a field that contains the delimiter)")
    return f"{path}: cannot parse as {fmt}: {msg}"


def bad_utf8(path: Path, chunk: int = 1 << 20) -> str:
    """``path: line L, column C (byte B): not valid UTF-8 text`` for the first bad byte."""
    import codecs

    dec, offset, line, line_start = codecs.getincrementaldecoder("utf-8")(), 0, 1, 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            try:
                dec.decode(block)
            except UnicodeDecodeError as e:
                # e.start counts within the bytes the decoder held: its buffered tail plus this block.
                bad = offset - (len(e.object) - len(block)) + e.start
                f.seek(0)
                head = f.read(bad)
                line = head.count(b"\n") + 1
                line_start = head.rfind(b"\n") + 1
                return (f"{path}: line {line}, column {bad - line_start + 1} (byte {bad}): "
                        f"not valid UTF-8 text (0x{e.object[e.start]:02x})")
            offset += len(block)
    return f"{path}: not valid UTF-8 text"


def bad_json(path: Path, fmt: str) -> str | None:
    """The line and column of the first JSON error (a JSONL line, or a whole .json file)."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            if fmt == "json" and f.read(1) in "[{":
                f.seek(0)
                json.load(f)
                return None
            f.seek(0)
            for n, text in enumerate(f, 1):
                if text.strip():
                    try:
                        json.loads(text)
                    except json.JSONDecodeError as e:
                        return f"{path}: line {n}, column {e.colno}: invalid JSON ({e.msg})"
    except json.JSONDecodeError as e:
        return f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})"
    except UnicodeDecodeError:
        return bad_utf8(path)
    return None


def _header_only(path: Path) -> bool:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip()) == 1


def stable_bucket(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by key and seed (independent of Python's hash seed)."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_by_fraction(ds, cfg: DataConfig, need: list[str], group_column: str | None = None) -> dict:
    """Cut the splits in ``need`` (validation/test) out of ``ds`` deterministically.

    With ``group_column`` whole groups go to one split (e.g. all reviews of one film).
    """
    fracs = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
    keys = ds[group_column] if group_column else [str(i) for i in range(len(ds))]
    idx: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for i, k in enumerate(keys):
        u = stable_bucket(str(k), cfg.split_seed)
        lo = 0.0
        dest = "train"
        for split in ("test", "validation"):
            if split in need:
                hi = lo + fracs[split]
                if lo <= u < hi:
                    dest = split
                    break
                lo = hi
        idx[dest].append(i)
    return {k: ds.select(v) for k, v in idx.items() if k == "train" or k in need}


def load_splits(cfg: DataConfig, builtin_loader=None, group_column: str | None = None, clean=None,
                bad: BadRows | None = None) -> dict:
    """train/validation/test datasets from files, a builtin, or a hub dataset.

    ``clean(split, ds) -> ds`` checks (and may filter) each split as read, before splits are
    cut from train or sub-sampled; ``bad`` receives the CoNLL lines without a token.
    """
    import datasets

    if cfg.source and cfg.source.startswith("builtin:"):
        if builtin_loader is None:
            raise DataError(f"task.data.source: builtin '{cfg.source}' is not available for this task")
        full, group_column = builtin_loader(cfg.source)
        splits = {"train": full}
    elif cfg.source:
        try:
            dd = datasets.load_dataset(cfg.source)
        except Exception as e:
            raise DataError(f"task.data.source: cannot load dataset '{cfg.source}': {e}") from None
        splits = {k if k != "dev" else "validation": v for k, v in dd.items()}
    else:
        if cfg.train is None:
            raise DataError("task.data: set either 'source' or 'train' (a file)")
        splits = {s: load_file(cfg.path(s), cfg.format, bad and (lambda msg, s=s: bad.found(s, msg)))
                  for s in ("train", "validation", "test") if cfg.path(s)}
    if clean is not None:
        splits = {s: clean(s, ds) for s, ds in splits.items()}
    need = [s for s in ("validation", "test") if s not in splits]
    if need:
        cut = split_by_fraction(splits["train"], cfg, need, group_column)
        splits.update(cut)
    for name, ds in splits.items():
        if len(ds) == 0:
            raise DataError(f"task.data: split '{name}' is empty (check the file or the split fractions)")
    if cfg.max_train_samples and len(splits["train"]) > cfg.max_train_samples:
        splits["train"] = splits["train"].shuffle(seed=cfg.split_seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples:
        for s in ("validation", "test"):
            if len(splits[s]) > cfg.max_eval_samples:
                splits[s] = splits[s].select(range(cfg.max_eval_samples))
    return splits
