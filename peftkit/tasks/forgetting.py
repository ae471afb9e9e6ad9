"""Forgetting: what fine-tuning costs a decoder outside its task.

Before training and after it, the language-model loss (mean cross-entropy per token, and its
perplexity) on a fixed sample of general text that is not the task's: ``task.forgetting.data``
(``builtin:general-text``, shipped in ``peftkit/data/general_text.jsonl``: English prose
paragraphs of the Python Language Reference, PSF License; or a user's ``.txt`` file, one
passage per blank-line-separated paragraph, or ``.jsonl`` with a ``text`` field). The text is
joined (eos between passages) and ``sequences`` blocks of ``max_length`` tokens are taken evenly
spread over it: the same blocks for every strategy of a comparison.

The rise in loss (after - before) is reported with its uncertainty: the blocks are paired
(same text before and after), so a bootstrap over blocks of the paired differences gives its
standard error and a 95% interval. A negative rise means the model got better at the text.

Only for decoders (``causal_lm``): an encoder has no next-token loss on plain text to compare
(its masked-LM head is dropped for the task head), and a seq2seq model's decoder is trained
conditioned on an input, so its loss on unconditioned text is not what it was trained to do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import Field

from peftkit.config import Section
from peftkit.errors import DataError

BUILTIN = "builtin:general-text"
BOOTSTRAP = 2000  # resamples of the paired per-block differences


class ForgettingConfig(Section):
    enabled: bool = True
    data: str = BUILTIN  # builtin:general-text, or a .txt / .jsonl (a 'text' field) file
    sequences: int = Field(24, ge=2)  # blocks of general text scored before and after training
    max_length: int = Field(128, ge=16)  # tokens per block
    batch_size: int = Field(8, ge=1)


def builtin_path() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "general_text.jsonl"


def read_texts(spec: str) -> list[str]:
    """The passages of ``task.forgetting.data``."""
    path = builtin_path() if spec == BUILTIN else Path(spec)
    where = f"task.forgetting.data ({spec})"
    if spec.startswith("builtin:") and spec != BUILTIN:
        raise DataError(f"{where}: unknown builtin; known: {BUILTIN}")
    if not path.is_file():
        raise DataError(f"{where}: file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        from peftkit.tasks.data import bad_utf8  # line and column, as for every data file

        raise DataError(f"task.forgetting.data: {bad_utf8(path)}") from None
    if path.suffix != ".jsonl":
        return [p.strip() for p in raw.split("\n\n") if p.strip()]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{where}: line {n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{where}: line {n}: expected an object with a 'text' string")
        texts.append(row["text"])
    return texts


def blocks(cfg: ForgettingConfig, tokenizer) -> list[list[int]]:
    """``cfg.sequences`` blocks of ``cfg.max_length`` tokens, evenly spread over the joined passages
    (the whole sample is represented, not only its first passages)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = [t for text in read_texts(cfg.data) for t in tokenizer(text, add_special_tokens=False)["input_ids"] + eos]
    n, need = cfg.max_length, cfg.sequences * cfg.max_length
    if len(flat) < need:
        raise DataError(f"task.forgetting.data ({cfg.data}): {len(flat)} tokens, fewer than task.forgetting.sequences"
                        f" x max_length = {need}; give more text or lower them")
    stride = (len(flat) // n) // cfg.sequences * n  # whole blocks between the starts
    return [flat[i * stride : i * stride + n] for i in range(cfg.sequences)]


@torch.no_grad()
def block_nll(model, seqs: list[list[int]], batch_size: int) -> list[float]:
    """Summed next-token cross-entropy of each block (all blocks have the same length)."""
    from peftkit.tasks.generation import example_nll

    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the same blocks give the same loss
    out: list[float] = []
    try:
        for k in range(0, len(seqs), batch_size):
            ids = torch.tensor(seqs[k : k + batch_size], device=dev)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            out += example_nll(logits[:, :-1], ids[:, 1:])[0]
            del logits
    finally:
        model.train(was_training)
    return out


def enabled(task) -> bool:
    cfg = getattr(task.cfg, "forgetting", None)
    return cfg is not None and cfg.enabled


def measure(task, model, autocast=None) -> dict | None:
    """The LM loss of each general-text block under ``model`` (None: not a decoder task, or off)."""
    if not enabled(task):
        return None
    cfg = task.cfg.forgetting
    seqs = blocks(cfg, task.tokenizer)
    from contextlib import nullcontext

    with autocast() if autocast is not None else nullcontext():
        nll = block_nll(model, seqs, cfg.batch_size)
    return {"data": cfg.data, "sequences": len(seqs), "tokens_per_sequence": cfg.max_length - 1, "nll": nll}


def before(task, model, run_dir: Path, resumed: bool, autocast=None, write: bool = True) -> dict | None:
    """The loss before training; a resumed run reads what its first start measured (its model
    is already partly trained), kept in RUN_DIR/forgetting_before.json."""
    if not enabled(task):
        return None
    from peftkit.io import atomic_write_json

    path = Path(run_dir) / "forgetting_before.json"
    if resumed and path.exists():
        return json.loads(path.read_text())
    m = measure(task, model, autocast)
    if write:
        atomic_write_json(path, m)
    return m


def after(start: dict | None, task, model, autocast=None) -> dict:
    """result.json's ``forgetting``: the loss before and after and the rise with its uncertainty."""
    if start is None:
        why = ("off (task.forgetting.enabled: false)" if getattr(task.cfg, "forgetting", None) is not None
               else "measured only for decoders (causal_lm)")
        return {"skipped": why}
    end = measure(task, model, autocast)
    return summarize(start, end)


def summarize(start: dict, end: dict, seed: int = 0) -> dict:
    n = start["tokens_per_sequence"]
    b = [x / n for x in start["nll"]]  # mean loss per token of each block
    a = [x / n for x in end["nll"]]
    out = {"data": start["data"], "sequences": len(b), "tokens": int(n * len(b)),
           "loss_before": sum(b) / len(b), "loss_after": sum(a) / len(a),
           "perplexity_before": math.exp(min(sum(b) / len(b), 50.0)),
           "perplexity_after": math.exp(min(sum(a) / len(a), 50.0)), **paired_rise(b, a, seed),
           "block_loss_before": b, "block_loss_after": a}
    return out


def paired_rise(before: list[float], after: list[float], seed: int = 0) -> dict:
    """Mean rise after - before over paired blocks, its bootstrap standard error and 95% interval."""
    import numpy as np

    d = np.array(after) - np.array(before)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"rise": float(d.mean()), "rise_se": float(boot.std(ddof=1)), "rise_ci95": [float(lo), float(hi)],
            "uncertainty": f"bootstrap over the {len(d)} paired blocks ({BOOTSTRAP} resamples)"}
