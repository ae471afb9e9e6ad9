"""Padding-free training batches for causal LMs (``train.padding_free: true``).

A batch becomes ONE row: the sequences concatenated, ``position_ids`` restarting at 0 for
each sequence and no attention mask. transformers turns restarting position ids into
per-sequence attention: FlashAttention-2 runs variable-length kernels (no FLOP or byte is
spent on padding); SDPA/eager build a block-diagonal mask (same result, no speed-up). The
loss is the mean over the same label tokens as the padded batch's.
"""

from __future__ import annotations

from peftkit.errors import UserError


class PaddingFree:
    """Collator over features with token-level ``labels`` (causal LM tasks)."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        # separator -100: the first label of each sequence is not predicted from the previous one.
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, features: list[dict]) -> dict:
        rows = []
        for f in features:
            labels = f.get("labels", f["input_ids"])
            if not isinstance(labels, (list, tuple)) or len(labels) != len(f["input_ids"]):
                raise UserError("train.padding_free: needs one label per token (a causal-LM task); "
                                "this task has one label per example")
            rows.append({"input_ids": list(f["input_ids"]), "labels": list(labels)})
        # use_cache=False: with a KV cache transformers does not look for packed sequences
        # (SDPA/eager would then attend across sequence boundaries).
        return {**self.flatten(rows, return_tensors="pt"), "use_cache": False}


def batch_counts(batch: dict) -> tuple[int, int]:
    """(sequences, real tokens) of a padded or padding-free batch."""
    if "attention_mask" in batch:
        return int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
    if "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum()), int(batch["position_ids"].numel())
    ids = batch["input_ids"]
    return int(ids.shape[0]), int(ids.numel())


def is_padding_free(batch: dict) -> bool:
    return "attention_mask" not in batch and "position_ids" in batch and batch["position_ids"].shape[0] == 1


__all__ = ["PaddingFree", "batch_counts", "is_padding_free"]
