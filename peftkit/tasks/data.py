"""Loading splits from files (or a hub name, or a builtin) through ``datasets``."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from ..errors import DataError
from .base import DataConfig

_EXT = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
        ".conll": "conll", ".txt": "conll"}


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz")]
    ext = suffixes[-1] if suffixes else ""
    if ext not in _EXT:
        raise DataError(f"{path}: cannot tell the file format from '{ext}'; set task.data.format")
    return _EXT[ext]


def read_conll(path: Path):
    """CoNLL/BIO text -> Dataset(tokens, tags): first column = token, last column = tag.

    A sentence ends at a line that is empty after strip() (some files use a lone tab).
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
                raise DataError(f"{path}: line {n}: expected 'token<TAB>tag', got {s[:60]!r}")
            sent_tok.append(parts[0].strip())
            sent_tag.append(parts[-1].strip())
    if sent_tok:
        tokens.append(sent_tok)
        tags.append(sent_tag)
    return datasets.Dataset.from_dict({"tokens": tokens, "tags": tags})


def load_file(path: Path, fmt: str):
    """One file -> datasets.Dataset."""
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
            ds = read_conll(path)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
        if len(ds) == 0:
            raise DataError(f"{path}: no rows")
        return ds
    else:
        raise DataError(f"{path}: format '{fmt}' is not supported by this task")
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    except Exception as e:  # datasets wraps parser errors in its own types
        cause = e.__cause__ or e
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{path}: not valid UTF-8 text (byte {cause.start})") from None
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
        raise DataError(f"{path}: cannot parse as {fmt}: {msg}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")
    return ds


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


def load_splits(cfg: DataConfig, builtin_loader=None, group_column: str | None = None) -> dict:
    """train/validation/test datasets from files, a builtin, or a hub dataset."""
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
        splits = {s: load_file(cfg.path(s), cfg.format) for s in ("train", "validation", "test") if cfg.path(s)}
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
